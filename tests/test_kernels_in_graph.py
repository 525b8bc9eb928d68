"""Under torch.compile the ops decompose into their Triton kernels on CUDA, and only there.

CPU: the decomposition rule declines (the op stays one opaque node, run by the reference).
GPU (marked): Inductor's output code launches `_attn_fwd` / `_attn_bwd_*` itself and calls no
`flash.fwd`/`flash.bwd`; outputs and gradients match a float64 reference; `dynamic=True` and
`kernels_in_graph = False` keep the opaque op.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from functorch.compile import make_boxed_func

import flash_inductor
from conftest import make_qkv, rel_err

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _aot_graphs(fn, *args):
    graphs = []

    def capture(gm, _example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    out = torch.compile(fn, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True)(*args)
    return out, graphs


def _attn(q, k, v, bias):
    return flash_inductor.attention(q, k, v, bias, causal=True)


def test_cpu_op_stays_opaque_in_the_aot_graphs():
    q, k, v = make_qkv(requires_grad=True)
    bias = torch.randn(1, 2, 37, 37, requires_grad=True)
    out, graphs = _aot_graphs(_attn, q, k, v, bias)
    out.sum().backward()
    assert len(graphs) == 2
    fw, bw = (g.code for g in graphs)
    assert "torch.ops.flash.fwd.default" in fw and "triton_kernel_wrapper" not in fw
    assert "torch.ops.flash.bwd.default" in bw and "triton_kernel_wrapper" not in bw
    ref = flash_inductor.attention_ref(q.double(), k.double(), v.double(), bias.double(), causal=True)
    assert rel_err(out, ref) < 1e-5


def test_a_cutlass_forward_keeps_its_triton_backward_in_the_graph(monkeypatch):
    """CUTLASS runs the forward as one opaque op; its backward is Triton's, so the backward
    decision goes in-graph while the forward's says why not. Tensors stand in for CUDA ones."""
    import types

    from flash_inductor import dispatch
    from flash_inductor import kernels_in_graph as kig
    from flash_inductor.backends.cutlass import CutlassBackend
    from flash_inductor.inputs import validate

    q, k, v = make_qkv()
    inp = validate(q, k, v)
    on_cuda = [types.SimpleNamespace(device=torch.device("cuda"), shape=t.shape, stride=t.stride,
                                     storage_offset=t.storage_offset) for t in (q, k, v)]
    monkeypatch.setattr(dispatch, "select", lambda inp, varlen=False, kernel=None: CutlassBackend())
    assert kig._triton_decision(inp, on_cuda, "fwd") == "dispatch picks cutlass"
    assert kig._triton_decision(inp, on_cuda, "bwd") is None
    monkeypatch.setattr(dispatch, "select", lambda inp, varlen=False, kernel=None: dispatch.BY_NAME["reference"])
    assert kig._triton_decision(inp, on_cuda, "bwd") == "dispatch picks reference"


def test_decision_says_why_the_op_stays_opaque(monkeypatch):
    """The gate in words (what the debug log prints): switched off, not on CUDA, symbolic sizes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from flash_inductor import kernels_in_graph as kig
    from flash_inductor.inputs import validate

    q, k, v = make_qkv()
    inp = validate(q, k, v)
    assert kig._triton_decision(inp, [q, k, v]) == "not on CUDA"
    monkeypatch.setenv(kig.ENV_VAR, "0")
    assert kig._triton_decision(inp, [q, k, v]) == "switched off"
    monkeypatch.delenv(kig.ENV_VAR)
    monkeypatch.setattr(flash_inductor.config, "kernels_in_graph", False)
    assert kig._triton_decision(inp, [q, k, v]) == "switched off"
    monkeypatch.setattr(flash_inductor.config, "kernels_in_graph", True)
    static = FakeTensorMode().from_tensor(q)
    symbolic = FakeTensorMode(shape_env=ShapeEnv()).from_tensor(q)  # sizes become symbols
    assert kig._is_static(static) and not kig._is_static(symbolic)


def _recorded_launches(run):
    """Every kernel launch `run(launch)` makes, as {argument name: value}, without launching."""
    launches = []

    def launch(kernel):
        import triton

        fn = kernel
        while not isinstance(fn, triton.runtime.JITFunction):  # Autotuner / Heuristics wrap it
            fn = fn.fn

        class Grid:
            def __getitem__(self, _grid):
                return lambda *args, **kwargs: launches.append((fn.__name__, {**dict(zip(fn.arg_names, args)), **kwargs}))

        return Grid()

    run(launch)
    return launches


@pytest.mark.parametrize("varlen", [False, True, "fused_dq"])
def test_traced_launches_pass_no_input_as_a_placeholder(varlen):
    """Traced for Inductor, a pointer a kernel does not use gets a fresh empty tensor, never an
    input: torch's analysis of what a Triton kernel writes is conservative (it names unused
    pointers such as CuQ), and an input it names would be written back, which AOTAutograd refuses
    for a leaf that requires grad. Each input may appear only under its own argument names."""
    from flash_inductor.inputs import validate
    from flash_inductor.kernels import triton_attention as ta

    q, k, v = make_qkv(1, 2, 2, 40, head_dim=16)
    out, dout = torch.randn_like(q), torch.randn_like(q)
    lse = torch.randn(1, 2, 40)
    if varlen is True:
        pq, pk, pv, po, pd = (t[0].transpose(0, 1).contiguous() for t in (q, k, v, out, dout))
        cu = torch.tensor([0, 15, 40], dtype=torch.int32)
        own = {"Q": pq, "K": pk, "V": pv, "Out": po, "DO DOut": pd, "CuQ CuK": cu}

        def run(launch):
            ta.forward_varlen(pq, pk, pv, cu, cu, 25, 25, 1, 0.25, 0.0, None, launch=launch)
            ta.backward_varlen(pd, None, pq, pk, pv, cu, cu, 25, 25, None, po, lse[0].T.contiguous(), 1, 0.25, 0.0,
                               launch=launch)
    else:
        own = {"Q": q, "K": k, "V": v, "Out": out, "DO DOut": dout}
        # With dropout the dK/dV kernel adds dQ into an accumulator (`fused_dq`), and no dQ kernel runs.
        p, seed = (0.1, torch.tensor([1, 2])) if varlen == "fused_dq" else (0.0, None)
        if seed is not None:
            own["Seed"] = seed

        def run(launch):
            inp = validate(q, k, v, causal=True, dropout_p=p)
            ta.forward(inp, seed, launch=launch)
            ta.backward(inp, seed, out, lse, dout, None, False, launch=launch)

    launches = _recorded_launches(run)
    names = {name for name, _ in launches}
    if varlen == "fused_dq":
        assert names == {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv"}
        (dkdv,) = (args for name, args in launches if name == "_attn_bwd_dkdv")
        assert dkdv["FUSED_DQ"] and dkdv["DQAcc"].shape == q.shape and dkdv["DQAcc"].dtype == torch.float32
    else:
        # dK/dV and dQ as two kernels, or one grid (`_attn_bwd_joint`).
        assert names >= {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"} or names >= {"_attn_fwd", "_attn_bwd_joint"}
    for kernel, args in launches:
        for name, value in args.items():
            for names, t in own.items():
                assert value is not t or name in names.split(), f"{kernel}: input {names} passed as {name}"

@pytest.mark.parametrize("p", [0.0, 0.1], ids=["two_kernels", "fused_dq"])
def test_eager_launches_never_pass_an_input_where_the_autotuner_restores(p, monkeypatch):
    """Called eagerly, unused pointers get q itself (nothing allocated); but an argument in an
    autotuner's `restore_value` is written back in place after each timed config, even a lone
    one, which bumps the input's autograd version (GPU: "modified by an inplace operation" on
    the next backward through the same graph). Those arguments always get their own tensor."""
    import triton

    from flash_inductor.inputs import validate
    from flash_inductor.kernels import triton_attention as ta

    q, k, v = make_qkv(1, 2, 2, 40, head_dim=16)
    out, dout, lse = torch.randn_like(q), torch.randn_like(q), torch.randn(1, 2, 40)
    seed = torch.tensor([1, 2]) if p else None
    launches = []

    def record(kernel):
        class Grid:
            def __getitem__(self, _grid):
                fn = kernel
                while not isinstance(fn, triton.runtime.JITFunction):
                    fn = fn.fn
                restored = getattr(kernel, "restore_value", None) or []
                return lambda *args, **kw: launches.append(({**dict(zip(fn.arg_names, args)), **kw}, restored))

        return Grid()

    monkeypatch.setattr(ta, "_direct", record)  # `_unused` then hands out q, as eagerly
    monkeypatch.setenv("FLASH_INDUCTOR_BWD_JOINT", "0")  # the dK/dV kernel with its autotuner
    inp = validate(q, k, v, causal=True, dropout_p=p)
    ta.backward(inp, seed, out, lse, dout, None, False, launch=record)
    assert any(restored for _, restored in launches)
    for args, restored in launches:
        for name in restored:
            assert all(args[name] is not t for t in (q, k, v, out, dout, lse)), name


def test_one_trace_classifies_a_shared_mask_once(monkeypatch):
    """Every layer of a model passes the same mask: inside one trace (`shared_in_trace`) its
    tile map is built by the first call and its lists reused, the backward adding only the
    dK/dV lists; another mask, or the same one changed in place, is classified again."""
    from flash_inductor.inputs import validate
    from flash_inductor.kernels import mask_tiles
    from flash_inductor.kernels import triton_attention as ta

    monkeypatch.setattr(mask_tiles, "MIN_FLOPS", 0)
    q, k, v = make_qkv(2, 2, 2, 300, head_dim=16)
    idx = torch.arange(300)
    mask = ((idx[None, :] <= idx[:, None]) & (idx < torch.tensor([300, 200])[:, None, None]))[:, None]
    out, dout, lse = torch.randn_like(q), torch.randn_like(q), torch.randn(2, 2, 300)

    def layers(masks):
        def run(launch):
            for m in masks:
                inp = validate(q, k, v, m)
                ta.forward(inp, None, launch=launch)
            for m in reversed(masks):
                ta.backward(validate(q, k, v, m), None, out, lse, dout, None, False, launch=launch)
        with mask_tiles.shared_in_trace({}):
            names = [name for name, args in _recorded_launches(run)]
        return names.count("_classify_tiles"), names.count("_build_lists"), names.count("_attn_fwd")

    assert layers([mask] * 4) == (1, 2, 4)
    assert layers([mask, mask.clone(), mask]) == (2, 4, 3)
    changed = mask.clone()

    def run(launch):
        ta.forward(validate(q, k, v, changed), None, launch=launch)
        changed[0, 0, 0, 0] = False  # in place: the version moves
        ta.forward(validate(q, k, v, changed), None, launch=launch)

    with mask_tiles.shared_in_trace({}):
        assert [n for n, _ in _recorded_launches(run)].count("_classify_tiles") == 2
    # Outside a trace nothing is shared.
    assert [n for n, _ in _recorded_launches(lambda launch: [ta.forward(validate(q, k, v, mask), None, launch=launch)
                                                             for _ in range(2)])].count("_classify_tiles") == 2


# ---- GPU --------------------------------------------------------------------------------------


def _inductor_code(fn, *args, **compile_kwargs):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(fn, **compile_kwargs)
    return run_and_get_code(compiled, *args)


CASES = {
    # (B, Hq, Hkv, N, D, dtype, causal, bias shape or None, dropout_p)
    "bf16_causal_bias_grad": (2, 4, 4, 300, 64, torch.bfloat16, True, (1, 4, 300, 300), 0.0),
    "fp16_gqa_mask": (2, 8, 2, 257, 128, torch.float16, False, (2, 1, 1, 257), 0.0),
    # What HF's SDPA path hands over: a bool causal+padding mask, read through the mask tiles.
    "bf16_bool_mask_tiles": (2, 4, 2, 400, 64, torch.bfloat16, False, "bool", 0.0),
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_inductor_launches_our_kernels(case, monkeypatch):
    monkeypatch.setenv("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")
    from flash_inductor.kernels import mask_tiles

    monkeypatch.setattr(mask_tiles, "MIN_FLOPS", 0)  # the map in the graph, at a test's size
    B, Hq, Hkv, N, D, dtype, causal, bshape, p = CASES[case]
    q, k, v = make_qkv(B, Hq, Hkv, N, head_dim=D, dtype=dtype, device="cuda", requires_grad=True)
    bias = None
    if bshape == "bool":
        idx = torch.arange(N, device="cuda")
        bias = (idx[None, :] <= idx[:, None]) & (idx < torch.tensor([N, N // 3], device="cuda")[:, None, None])
        bias = bias[:, None]  # [B, 1, N, N]
    elif bshape is not None:
        bias = torch.randn(bshape, device="cuda", dtype=dtype, requires_grad=bshape[0] == 1)

    def step(q, k, v, bias):
        out = flash_inductor.attention(q, k, v, bias, causal=causal, dropout_p=p)
        leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
        dout = torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1], device=out.device, dtype=out.dtype)
        return (out, *torch.autograd.grad(out, leaves, dout))

    got, code = _inductor_code(step, q, k, v, bias)
    code = "\n".join(code)
    assert "_attn_fwd" in code and "_attn_bwd_dq" in code and "_attn_bwd_dkdv" in code
    assert "flash.fwd" not in code and "flash.bwd" not in code

    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v)]
    b64 = bias.detach().double().requires_grad_(bias.requires_grad) if bias is not None and bias.is_floating_point() else bias
    ref = step(*leaves64, b64)
    for name, g, r in zip(("out", "dq", "dk", "dv", "dbias"), got, ref):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 2e-2, f"{name}: {rel_err(g, r):.3g}"


@pytest.mark.gpu
@needs_cuda
def test_gpu_dropout_in_graph_is_random_and_consistent(monkeypatch):
    """Inductor draws the seed: two calls differ, and each backward regenerates its mask
    (with v = identity the output is the scaled keep-mask; dv then equals its transpose·dout)."""
    monkeypatch.setenv("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")
    N, p = 128, 0.25
    q = torch.zeros(1, 1, N, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.zeros(1, 1, N, 64, device="cuda", dtype=torch.float16)
    v = torch.eye(N, device="cuda", dtype=torch.float16).view(1, 1, N, N).requires_grad_()

    def step(q, k, v):
        out = flash_inductor.attention(q, k, v, dropout_p=p)
        (dv,) = torch.autograd.grad(out, [v], torch.ones_like(out))
        return out, dv

    torch._dynamo.reset()
    compiled = torch.compile(step)
    out1, dv1 = compiled(q, k, v)
    out2, _ = compiled(q, k, v)
    keep1 = out1[0, 0] != 0
    assert not torch.equal(keep1, out2[0, 0] != 0)
    assert abs(keep1.float().mean().item() - (1 - p)) < 0.02
    # dv[j, c] = sum_i P_drop[i, j] · 1: every column of dv is the column sums of the dropped,
    # scaled probabilities, which (v = identity) is what the forward returned.
    torch.testing.assert_close(dv1[0, 0, :, 0].float(), out1[0, 0].float().sum(0), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_dropout_backward_in_the_graph(monkeypatch):
    """With dropout Inductor's backward is the one-kernel one (dQ added by the dK/dV kernel) and
    every gradient matches float64 autograd under the keep-mask the forward drew (v = identity
    makes the forward's output the scaled, dropped probabilities, so the mask is read off it)."""
    monkeypatch.setenv("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")
    monkeypatch.delenv("FLASH_INDUCTOR_FUSED_DQ", raising=False)
    Hq, N, D, p = 4, 128, 64, 0.2
    gen = torch.Generator().manual_seed(17)
    q = (torch.randn(2, Hq, N, D, generator=gen) * 0.3).cuda().half().requires_grad_()
    k = (torch.randn(2, 2, N, D, generator=gen) * 0.3).cuda().half().requires_grad_()
    v = torch.eye(N).expand(2, 2, N, N).contiguous().cuda().half().requires_grad_()
    dout = torch.randn(2, Hq, N, N, generator=gen).cuda().half()

    def step(q, k, v):
        out = flash_inductor.attention(q, k, v, causal=True, dropout_p=p)
        return (out, *torch.autograd.grad(out, [q, k, v], dout))

    (out, dq, dk, dv), code = _inductor_code(step, q, k, v)
    code = "\n".join(code)
    assert "_attn_bwd_dkdv" in code and "_attn_bwd_dq" not in code

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q64 @ k64.repeat_interleave(2, 1).transpose(-1, -2) / D ** 0.5
    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    keep = out != 0  # every visible probability is far from 0 at these score sizes
    ref = (s.softmax(-1) * keep / (1 - p)) @ v64.repeat_interleave(2, 1)
    ref_grads = torch.autograd.grad(ref, [q64, k64, v64], dout.double())
    assert rel_err(out, ref) < 1e-2
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 2e-2, f"{name}: {rel_err(g, r):.3g}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("how", ["dynamic", "switched_off"])
def test_gpu_op_stays_opaque_when_it_should(how, monkeypatch):
    monkeypatch.setenv("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")
    q, k, v = make_qkv(2, 4, None, 200, head_dim=64, dtype=torch.bfloat16, device="cuda")
    kwargs = {"dynamic": True} if how == "dynamic" else {}
    if how == "switched_off":
        monkeypatch.setattr(flash_inductor.config, "kernels_in_graph", False)
    out, code = _inductor_code(lambda q, k, v: flash_inductor.attention(q, k, v), q, k, v, **kwargs)
    assert "flash.fwd" in "\n".join(code)
    ref = flash_inductor.attention_ref(q.double(), k.double(), v.double())
    assert rel_err(out, ref) < 1e-2


def _softcapped(q, k, v, mask):
    """Gemma 2's eager attention: scale, soft-cap, add the mask, float32 softmax."""
    w = torch.matmul(q, k.transpose(-1, -2)) * 0.125
    w = torch.tanh(w / 30.0) * 30.0 + mask
    return torch.matmul(w.softmax(-1, dtype=torch.float32).to(q.dtype), v)


@pytest.mark.gpu
@needs_cuda
def test_gpu_rewrite_never_swaps_eager_attention_for_the_reference():
    """float64 has no fused kernel on CUDA: the site stays eager (guard fused_kernel)."""
    from flash_inductor.rewrite.matcher import rewrite_graph

    reports = {}

    def capture(gm, example_inputs):
        reports["r"] = rewrite_graph(gm)
        return gm.forward

    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, None, 64, head_dim=64, dtype=torch.float64, device="cuda")
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.float64, device="cuda")
    torch.compile(_softcapped, backend=capture, fullgraph=True)(q, k, v, mask)
    assert [r.guard for r in reports["r"]] == ["fused_kernel"]


@pytest.mark.gpu
@needs_cuda
def test_gpu_softcapped_attention_runs_our_kernels(monkeypatch):
    """Gemma 2's soft-capped scores under backend="flash": the Triton kernels in Inductor's
    graph, output and gradients against float64 eager."""
    monkeypatch.setenv("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")
    q, k, v = make_qkv(2, 4, None, 300, head_dim=64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    q = (q.detach() * 4).requires_grad_()  # scores of ~8 so the cap of 30 bends them
    idx = torch.arange(300, device="cuda")
    mask = torch.where(idx[None, :] <= idx[:, None], 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
    mask = mask.expand(2, 1, 300, 300)

    def step(q, k, v, mask):
        out = _softcapped(q, k, v, mask)
        return (out, *torch.autograd.grad(out, [q, k, v], torch.ones_like(out)))

    got, code = _inductor_code(step, q, k, v, mask, backend="flash")
    code = "\n".join(code)
    assert "_attn_fwd" in code and "_attn_bwd_dq" in code and "_attn_bwd_dkdv" in code
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = step(*leaves64, mask.double())
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 2e-2, f"{name}: {rel_err(g, r):.3g}"


def _with_sinks(q, k, v, sinks, mask):
    """GPT-OSS's eager attention: a learned logit per head joins the max-shifted softmax in the
    logits' dtype, and its column is dropped."""
    w = torch.matmul(q, k.transpose(-1, -2)) * 0.125 + mask
    sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    logits = torch.cat([w, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    return torch.matmul(torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1], v)


def _granite_sinks(q, k, v, sinks, mask):
    """Granite-SWA's spelling of the same sink: sigmoid(logsumexp(scores) - sink) times P·V."""
    w = torch.matmul(q, k.transpose(-1, -2)) * 0.125 + mask
    scale = (torch.logsumexp(w, dim=-1) - sinks.view(1, -1, 1)).to(torch.float32).sigmoid()
    out = torch.matmul(torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)
    return out * scale.unsqueeze(-1).to(out.dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
@pytest.mark.parametrize("spelling", [_with_sinks, _granite_sinks], ids=["gpt_oss", "granite_swa"])
def test_attention_sinks_run_fused(spelling, device, monkeypatch):
    """GPT-OSS's sinks (and Granite-SWA's, through logsumexp) under backend="flash" in bf16: our
    kernels in Inductor's graph (the Triton ones on a GPU), the lse they return scaling the
    output, and every gradient (the sinks' included) against float64 eager; a padded batch row
    whose queries see no key gives 0, as eager does."""
    monkeypatch.setenv("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")
    q, k, v = make_qkv(2, 4, None, 300, head_dim=64, dtype=torch.bfloat16, device=device, requires_grad=True)
    sinks = (torch.randn(4, device=device) * 2).to(torch.bfloat16).requires_grad_()
    idx = torch.arange(300, device=device)
    visible = (idx[None, :] <= idx[:, None]).expand(2, 1, 300, 300).clone()
    visible[1, :, :, :40] = False  # left padding: the first 40 queries of row 1 see nothing
    mask = torch.where(visible, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)

    def step(q, k, v, sinks, mask):
        out = spelling(q, k, v, sinks, mask)
        return (out, *torch.autograd.grad(out, [q, k, v, sinks], torch.ones_like(out)))

    got, code = _inductor_code(step, q, k, v, sinks, mask, backend="flash")
    code = "\n".join(code)
    if device == "cuda":
        assert "_attn_fwd" in code and "_attn_bwd_dq" in code and "_attn_bwd_dkdv" in code
    else:
        assert "flash.fwd" in code and "flash.bwd" in code
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref = step(*leaves64, mask.double())
    for name, g, r in zip(("out", "dq", "dk", "dv", "dsinks"), got, ref):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 2e-2, f"{name}: {rel_err(g, r):.3g}"
    assert got[0][1, :, :40].abs().max().item() == 0.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", ["llama", "bert", "bloom"])
def test_hf_model_with_ragged_padding_matches_eager(name, padding, device, monkeypatch):
    """A (small) HF model in float32 with a ragged padded batch, compiled with backend="flash":
    its padding mask ([B, 1, N, N] causal + padding for LLaMA, key padding for BERT) goes through
    the mask tiles on a GPU; left padding leaves LLaMA rows with no real key, which eager averages
    (the rewrite's fix-up). BLOOM adds ALiBi to its mask, so the rewrite cannot see the bias's
    values: its fully masked rows take the general fix-up (a row of finfo.min; NaN before it). Forward at every position, padded ones included, and the gradient of
    every parameter for a loss over the real tokens (as training computes it), against eager."""
    monkeypatch.setenv("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")
    from flash_inductor import models

    built = models.build(name, size="tiny", seq_len=300, device=device)
    mask = torch.ones(2, 300, dtype=torch.long, device=device)
    if padding == "left":
        mask[1, :170] = 0
    else:
        mask[1, 130:] = 0
    inputs = dict(built.inputs, attention_mask=mask)
    model = built.model.eval()
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        torch._dynamo.reset()
        got = torch.compile(model, backend="flash")(**inputs).last_hidden_state
    assert rel_err(got, want.double()) < 1e-4

    # A fixed random projection of the real tokens' states (a norm of a LayerNorm output would
    # be constant, and its gradients rounding noise).
    proj = torch.randn(want.shape[-1], generator=torch.Generator().manual_seed(0)).to(device)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        h = fn(**inputs).last_hidden_state
        ((h @ proj) * mask).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    want_g = grads(model)
    torch._dynamo.reset()
    got_g = grads(torch.compile(model, backend="flash"))
    # Parameters outside the loss (BERT's pooler) get no gradient in eager, zeros compiled.
    assert want_g.keys() <= got_g.keys()
    assert all(not got_g[n].any() for n in got_g.keys() - want_g.keys())
    # BERT's key.bias gradient is zero in exact arithmetic (softmax cancels a per-row shift):
    # rounding noise, bounded by an absolute floor relative to the largest gradient.
    floor = 1e-8 * max(g.norm().item() for g in want_g.values())
    for n, w in want_g.items():
        assert (got_g[n] - w).norm().item() <= 1e-3 * w.norm().item() + floor, n


@pytest.mark.gpu
@needs_cuda
def test_gpu_openai_gpt_runs_our_kernels_under_its_run_time_checks(monkeypatch):
    """OpenAI GPT's s·b − 1e4·(1 − b) mask becomes a fill of -1e4 guarded by two
    `torch._assert_async` checks (docs/design.md §3). On CUDA Inductor lowers them to device-side
    asserts beside our kernels; with left padding (rows with no real key: eager's softmax over the
    filled keys), forward and every parameter's gradient match the model in float64."""
    monkeypatch.setenv("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")
    import copy

    from torch._inductor.utils import run_and_get_code

    from flash_inductor import models

    built = models.build_any("openai-gpt", seq_len=48)
    model = built.model.cuda().eval()
    mask = torch.ones(2, 48, dtype=torch.long, device="cuda")
    mask[1, :20] = 0
    inputs = dict(input_ids=built.inputs["input_ids"].cuda(), attention_mask=mask)
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        want = ref64(**inputs).last_hidden_state
        torch._dynamo.reset()
        got, code = run_and_get_code(torch.compile(model, backend="flash"), **inputs)
    code = "\n".join(code)
    assert "_attn_fwd" in code and "flash.fwd" not in code
    assert "device_assert" in code or "assert_async" in code
    assert rel_err(got.last_hidden_state, want) < 1e-4

    # A fixed random projection as the loss: a mean of squares after the last LayerNorm leaves
    # the lower layers gradients 1e-6 of the largest, cancellation noise in float32 eager too.
    proj = torch.randn(got.last_hidden_state.shape[-1], generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64).cuda()

    def grads(fn, m):
        m.zero_grad(set_to_none=True)
        (fn(**inputs).last_hidden_state.double() @ proj).sum().backward()
        return {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}

    model.train()
    want_g = grads(ref64.train(), ref64)
    torch._dynamo.reset()
    got_g = grads(torch.compile(model, backend="flash"), model)
    assert want_g.keys() == got_g.keys()
    for n, w in want_g.items():
        assert (got_g[n] - w).norm().item() <= 1e-4 * w.norm().item(), n


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_gpu_reduce_overhead_replays_our_kernels_as_cuda_graphs(dropout_p, monkeypatch):
    """mode="reduce-overhead" (CUDA graph trees) with the rewrite: a training step of a small
    HF BERT with a padding mask is captured whole (no cudagraph skip: nothing in our graph syncs
    with the host or lives on the CPU), replays match the model in float64 (without dropout), and
    dropout draws a fresh mask at every replay."""
    monkeypatch.setenv("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")
    import copy

    from torch._dynamo.utils import counters

    from flash_inductor import models

    built = models.build("bert", size="tiny", seq_len=200, device="cuda", dropout=0.0)
    model = built.model.train()
    for layer in model.encoder.layer:  # dropout on the probabilities only: ours to draw
        layer.attention.self.dropout.p = dropout_p
    mask = built.inputs["attention_mask"]
    proj = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)).cuda()

    def step(fn, m=model):
        torch.compiler.cudagraph_mark_step_begin()
        m.zero_grad(set_to_none=True)
        h = fn(**built.inputs).last_hidden_state
        ((h @ proj.to(h.dtype)) * mask).sum().backward()  # a random projection of the real tokens
        return h.detach().clone(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="flash", mode="reduce-overhead")
    replays = [step(compiled) for _ in range(4)]  # warm-up, record, then replays
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    if dropout_p == 0.0:
        ref64 = copy.deepcopy(model).double()
        want_h, want_g = step(ref64, ref64)
        # key.bias's gradient is zero in exact arithmetic (softmax cancels a per-row shift):
        # float32 rounding noise, bounded relative to the largest gradient.
        floor = 1e-6 * max(w.norm().item() for w in want_g.values())
        for h, g in replays[2:]:
            assert rel_err(h, want_h) < 1e-4
            for n, w in want_g.items():
                assert (g[n].double() - w).norm().item() <= 1e-4 * w.norm().item() + floor, n
    else:
        assert not torch.equal(replays[2][0], replays[3][0])
