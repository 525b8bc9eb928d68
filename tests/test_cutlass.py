"""The CUTLASS forward (csrc/, built on first use) against float64 attention, on an sm_90 GPU.

Every instance (fp16/bf16 × head dims 64/128/256 × no mask/top-left causal) on shapes with
lengths that are not multiples of the tiles, Nq ≠ Nk both ways, and the [B, N, H, D] layout HF
models pass; bottom-right causal and grouped KV heads (folded into rows) on a few of each; and
the bias instances on every bias layout the glue handles (per head, full, strided keys, odd
rows, broadcast, fully masked rows), each read the way the kernel picks for it (by TMA or in
the softmax). The backward is the CUTLASS backward where it takes the input (csrc/bwd_kernel.cuh
at head dims 64 and 128, csrc/bwd_d256.cuh at 256; each with a bias with or without its gradient,
and dropout), else the Triton backward fed the CUTLASS forward's out and lse;
each case asserts which one ran, and the gradients check both
against float64. Dropout (the dropout libraries' forward and backward) is held bit for bit to the
Triton kernels' keep mask, and its values and gradients to float64 with that mask. Outputs are
poisoned (NaN) before each run.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from flash_inductor import dispatch
from flash_inductor.backends.cutlass import CutlassBackend
from flash_inductor.backends.triton import TritonBackend
from flash_inductor.inputs import empty_in_layout, validate
from test_triton_kernels import _check_against_ref, _randn, poisoned  # noqa: F401  (poisoned: a fixture)

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU (H100/H200)")]

# (B, Hq, Hkv, Nq, Nk, layout)
SHAPES = [(2, 3, 3, 256, 256, "bhnd"), (1, 2, 2, 136, 200, "bnhd"), (1, 2, 2, 264, 136, "bhnd")]
CASES = list(itertools.product((torch.float16, torch.bfloat16), (64, 128, 256), (False, "top_left"), SHAPES))
# Bottom-right causal (Nq < Nk) and grouped KV heads, folded into rows: exact for any lengths
# without a mask, and with causal when Nq = Nk is a multiple of 128.
CASES += [
    (torch.bfloat16, 128, "bottom_right", (2, 3, 3, 136, 392, "bhnd")),
    (torch.float16, 256, "bottom_right", (1, 2, 2, 256, 320, "bnhd")),
    (torch.bfloat16, 128, False, (2, 8, 2, 200, 136, "bhnd")),
    (torch.float16, 128, False, (1, 4, 1, 72, 300, "bnhd")),
    (torch.bfloat16, 128, "top_left", (2, 8, 2, 384, 384, "bhnd")),
    (torch.bfloat16, 256, "top_left", (1, 6, 1, 256, 256, "bnhd")),
    (torch.float16, 128, "bottom_right", (1, 4, 2, 256, 256, "bhnd")),  # = top-left, folded
    # Head dim 128 without a mask runs the persistent kernel: more row blocks than an H100/H200
    # has SMs (256 and 384 against 132), so each CTA walks several, the last one partial
    (torch.bfloat16, 128, False, (4, 8, 8, 1000, 1000, "bhnd")),
    (torch.float16, 128, False, (3, 16, 4, 1000, 777, "bnhd")),  # grouped: 4000 folded rows a head
    # Head dim 64's blocks of 192 rows (three consumer warpgroups)
    (torch.bfloat16, 64, "bottom_right", (2, 3, 3, 136, 392, "bhnd")),
    (torch.float16, 64, False, (2, 8, 2, 200, 136, "bnhd")),
    (torch.bfloat16, 64, "top_left", (2, 8, 2, 384, 384, "bhnd")),  # folded: 2 blocks a head
    (torch.float16, 64, "top_left", (1, 4, 1, 768, 768, "bnhd")),
    # Head dim 256's own backward (64-key blocks): grouped heads whose rows are no multiple of 64;
    # bottom-right with far more keys than rows (each key block starts at its own query block);
    # folded causal over 10 key blocks
    (torch.bfloat16, 256, False, (2, 8, 2, 200, 136, "bhnd")),
    (torch.float16, 256, "bottom_right", (1, 2, 2, 72, 520, "bhnd")),
    (torch.bfloat16, 256, "top_left", (1, 4, 2, 640, 640, "bnhd")),
]


# Additive biases in q's dtype: (dtype, head dim, causal, shape, bias kind, how the kernel reads it).
# Kinds: "head" [1, H, Nq, Nk]; "full" [B, H, Nq, Nk] (an odd Nk is copied to rows of 8); "t5"
# an embedding permuted to [1, H, Nq, Nk] (keys H apart: copied); "rows" per-head with some
# rows all -inf (lse -inf, zeros); "expanded" one [Nq, Nk] expanded over B and H (stride 0);
# "keys" [B, H, 1, Nk] (broadcast over queries). Head dim 128 loads the bias by TMA ("tma"; the
# shapes TMA cannot take are refused there, tests/test_cutlass_build.py), 256 reads it in the
# softmax ("softmax").
BIAS_CASES = [
    (torch.bfloat16, 128, False, (2, 3, 3, 256, 256, "bhnd"), "head", "tma"),
    (torch.float16, 128, "top_left", (1, 2, 2, 136, 200, "bnhd"), "full", "tma"),
    (torch.bfloat16, 128, "top_left", (2, 3, 3, 200, 136, "bnhd"), "full", "tma"),  # batch stride
    (torch.bfloat16, 256, "top_left", (1, 2, 2, 264, 136, "bhnd"), "head", "softmax"),
    (torch.float16, 256, False, (2, 2, 2, 136, 201, "bhnd"), "full", "softmax"),
    (torch.bfloat16, 128, "top_left", (1, 4, 4, 256, 256, "bnhd"), "t5", "tma"),
    (torch.bfloat16, 128, False, (1, 2, 2, 128, 304, "bhnd"), "rows", "tma"),
    (torch.float16, 128, False, (2, 3, 3, 200, 256, "bhnd"), "expanded", "tma"),
    (torch.bfloat16, 256, False, (2, 2, 2, 136, 256, "bhnd"), "keys", "softmax"),
    (torch.bfloat16, 128, False, (2, 8, 2, 256, 136, "bhnd"), "head", "tma"),  # grouped, 256-row heads
    (torch.bfloat16, 128, "top_left", (1, 4, 2, 256, 256, "bhnd"), "full", "tma"),  # grouped + causal
    (torch.bfloat16, 128, "bottom_right", (1, 2, 2, 136, 392, "bhnd"), "head", "tma"),
    (torch.bfloat16, 64, "top_left", (1, 2, 2, 264, 136, "bhnd"), "head", "softmax"),
    (torch.float16, 64, False, (2, 2, 2, 136, 201, "bhnd"), "full", "softmax"),
    (torch.bfloat16, 64, "top_left", (1, 4, 2, 256, 256, "bnhd"), "t5", "softmax"),  # grouped + causal
    (torch.bfloat16, 64, "bottom_right", (1, 2, 2, 136, 392, "bhnd"), "rows", "softmax"),
]


def _make_bias(kind, b, hq, nq, nk, dtype, gen):
    if kind == "head":
        return torch.randn(1, hq, nq, nk, generator=gen).to(dtype)
    if kind == "full":
        return torch.randn(b, hq, nq, nk, generator=gen).to(dtype)
    if kind == "t5":
        return torch.randn(nq, nk, hq, generator=gen).to(dtype).permute(2, 0, 1)[None]
    if kind == "rows":
        bias = torch.randn(1, hq, nq, nk, generator=gen).to(dtype)
        bias[:, :, 5:9] = float("-inf")
        bias[:, 1, 40:, 100:] = float("-inf")
        return bias
    if kind == "expanded":
        return torch.randn(nq, nk, generator=gen).to(dtype).expand(b, hq, nq, nk)
    if kind == "keys":
        return torch.randn(b, hq, 1, nk, generator=gen).to(dtype)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def cutlass():
    from flash_inductor.backends import cutlass as module

    saved = set(module.UNVALIDATED), dict(module.SLOWER_THAN_TRITON), module.D64_MIN_SCORES
    module.UNVALIDATED.clear()  # these tests are the validation
    module.SLOWER_THAN_TRITON.clear()  # and they run what dispatch leaves to Triton for speed
    module.D64_MIN_SCORES = 0  # and head dim 64 on shapes that dispatch leaves to Triton
    dispatch.clear_choices()
    backend = CutlassBackend()
    why = backend.unavailable_reasons(torch.device("cuda"))
    assert not why, why  # on an H100/H200 with the toolkit and headers, the build must succeed
    yield backend
    module.UNVALIDATED.update(saved[0])
    module.SLOWER_THAN_TRITON.update(saved[1])
    module.D64_MIN_SCORES = saved[2]
    dispatch.clear_choices()


@pytest.mark.parametrize("dtype,d,causal,shape", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_forward_and_backward(cutlass, poisoned, dtype, d, causal, shape):
    b, hq, hkv, nq, nk, layout = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, d, causal, shape)).encode()))
    q = _randn((b, hq, nq, d), dtype, gen, layout).cuda()
    k, v = (_randn((b, hkv, nk, d), dtype, gen, layout).cuda() for _ in range(2))
    inp = validate(q, k, v, causal=causal)
    assert not cutlass.not_supported_reasons(inp), cutlass.not_supported_reasons(inp)
    assert cutlass.backward_kernel(inp) == "cutlass", cutlass.backward_reasons(inp)
    _check_against_ref(cutlass, poisoned, q, k, v, None, causal, gen)


@pytest.mark.parametrize("causal", [False, "top_left"])
def test_cutlass_backward_takes_the_lse_gradient_and_any_scale(cutlass, poisoned, causal):
    """dlse enters through delta (the preprocess kernel); the scale through dS. float32 inputs
    are not in the kernels, so the bound is the bf16 one on a float64 reference."""
    gen = torch.Generator().manual_seed(5 + bool(causal))
    q, k, v = (_randn((2, 3, 200, 128), torch.bfloat16, gen).cuda() for _ in range(3))
    inp = validate(q, k, v, causal=causal, scale=0.07)
    assert cutlass.backward_kernel(inp) == "cutlass"
    out, lse = cutlass.forward(inp, None)
    dout = _randn(out.shape, torch.bfloat16, gen).cuda()
    dlse = torch.randn(lse.shape, generator=gen).cuda()
    dq, dk, dv, dbias = poisoned(cutlass.backward, inp, None, out, lse, dout, dlse, False)
    assert dbias is None
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    s = leaves[0] @ leaves[1].transpose(-1, -2) * 0.07
    if causal:
        s = s.masked_fill(torch.ones(200, 200, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    lse64 = torch.logsumexp(s, -1)
    out64 = torch.softmax(s, -1) @ leaves[2]
    torch.autograd.backward((out64, lse64), (dout.double(), dlse.double()))
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), (t.grad for t in leaves)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 2e-2, f"{name}: {err:.3g}"


@pytest.mark.parametrize("dtype,d,causal,shape,kind,read", BIAS_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_bias_forward_and_triton_backward(cutlass, poisoned, dtype, d, causal, shape, kind, read):
    """The bias (loaded by TMA, or read in the softmax), against float64, and the backward with
    the bias gradient: the CUTLASS one at head dim 128, else Triton's from the CUTLASS out and lse."""
    b, hq, hkv, nq, nk, layout = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, d, causal, shape, kind)).encode()))
    q = _randn((b, hq, nq, d), dtype, gen, layout).cuda()
    k, v = (_randn((b, hkv, nk, d), dtype, gen, layout).cuda() for _ in range(2))
    bias = _make_bias(kind, b, hq, nq, nk, dtype, gen).cuda()
    inp = validate(q, k, v, bias, causal=causal)
    assert not cutlass.not_supported_reasons(inp), cutlass.not_supported_reasons(inp)
    assert cutlass.bias_read(inp) == read
    _check_against_ref(cutlass, poisoned, q, k, v, bias, causal, gen)


# The forward's bias in the CUTLASS backward: (dtype, causal, shape, bias kind)
BWD_BIAS_CASES = [
    (torch.bfloat16, False, (2, 3, 3, 256, 256, "bhnd"), "head"),
    (torch.float16, "top_left", (1, 2, 2, 136, 200, "bnhd"), "full"),  # keys past len_q trimmed
    (torch.bfloat16, "top_left", (1, 4, 4, 256, 256, "bnhd"), "t5"),
    (torch.bfloat16, False, (1, 2, 2, 128, 304, "bhnd"), "rows"),
    (torch.float16, False, (2, 3, 3, 200, 256, "bhnd"), "expanded"),
    (torch.bfloat16, False, (2, 8, 2, 256, 136, "bhnd"), "head"),  # grouped, folded rows
    (torch.bfloat16, "top_left", (1, 4, 2, 256, 256, "bhnd"), "full"),  # grouped + causal
    (torch.bfloat16, "bottom_right", (1, 2, 2, 136, 392, "bhnd"), "head"),
    (torch.float16, False, (1, 4, 2, 200, 256, "bnhd"), "full"),  # grouped, heads of 200 rows: tiles span two
    # Keys not a multiple of 8: the gradient's rows padded, their last chunk stored per element;
    # top-left with more rows than keys: the zeros of skipped tiles end in such a chunk too.
    (torch.bfloat16, "bottom_right", (1, 2, 2, 136, 203, "bhnd"), "full"),
    (torch.float16, "top_left", (1, 2, 2, 328, 203, "bhnd"), "full"),
]


@pytest.mark.parametrize("bias_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("dtype,causal,shape,kind", BWD_BIAS_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_cutlass_backward_with_the_forwards_bias(cutlass, poisoned, dtype, causal, shape, kind, d, bias_grad):
    """The forward's bias through the CUTLASS backward, without its gradient (a position bias,
    ALiBi, HF's additive padding mask) and with it (T5's learned bias): dQ, dK, dV and dbias
    against float64, rows the bias hides entirely included (their gradients are 0); the
    gradients come back in q's, k's and v's layouts. Head dim 128 reads the bias through shared
    memory (example 88's collective), 256 from global memory into registers (its own kernel)."""
    b, hq, hkv, nq, nk, layout = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("bwd bias", dtype, causal, shape, kind, d)).encode()))
    q = _randn((b, hq, nq, d), dtype, gen, layout).cuda()
    k, v = (_randn((b, hkv, nk, d), dtype, gen, layout).cuda() for _ in range(2))
    bias = _make_bias(kind, b, hq, nq, nk, dtype, gen).cuda()
    inp = validate(q, k, v, bias, causal=causal)
    assert cutlass.backward_kernel(inp) == "cutlass", cutlass.backward_reasons(inp)
    # Heads of 200 rows with grouped KV heads: the CUTLASS forward refuses them (its bias tiles
    # go by TMA), Triton's forward gives the same out and lse contract.
    forward = TritonBackend().forward if cutlass.not_supported_reasons(inp) else cutlass.forward
    out, lse = forward(inp, None)
    dout = _randn(out.shape, dtype, gen).cuda()
    dq, dk, dv, dbias = poisoned(cutlass.backward, inp, None, out, lse, dout, None, bias_grad)
    for name, got, like in zip(("dq", "dk", "dv"), (dq, dk, dv), (q, k, v)):
        assert got.stride() == empty_in_layout(like).stride(), name

    groups = hq // hkv
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    kk, vv = (t.repeat_interleave(groups, 1) for t in leaves[1:3])
    s = leaves[0] @ kk.transpose(-1, -2) * inp.scale + leaves[3]
    if causal:
        shift = nk - nq if causal == "bottom_right" else 0
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device="cuda").triu(1 + shift), float("-inf"))
    hidden = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.where(hidden, 0.0, torch.softmax(s.masked_fill(hidden, 0.0), -1))
    (p @ vv).backward(dout.double())
    grads = (dq, dk, dv) + ((dbias,) if bias_grad else ())
    if not bias_grad:
        assert dbias is None
    else:
        assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, (t.grad for t in leaves)):
        assert torch.isfinite(got).all(), name
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 2e-2, f"{name}: {err:.3g}"


# Dropout (the dropout libraries' instances): (dtype, head dim, causal, shape, bias kind or None, p).
# The CUTLASS forward draws the Triton kernels' keep bits, held bit for bit to tests/philox_mask.py
# (itself held to the Triton kernel on CPU); the CUTLASS backward redraws them from the same seed
# (at head dims 64 and 128 on the load warpgroup's spare warps, at 256 on every thread for its own
# scores). A "_nograd" bias is the forward's only (no dbias).
DROPOUT_CASES = [
    (torch.bfloat16, 128, False, (2, 3, 3, 256, 256, "bhnd"), None, 0.1),
    (torch.float16, 128, "top_left", (1, 2, 2, 136, 200, "bnhd"), None, 0.3),
    (torch.bfloat16, 256, "top_left", (1, 2, 2, 264, 136, "bhnd"), None, 0.1),
    (torch.float16, 256, False, (2, 2, 2, 136, 201, "bhnd"), "full", 0.2),  # bias read in the softmax
    (torch.bfloat16, 128, "bottom_right", (2, 3, 3, 136, 392, "bhnd"), None, 0.1),
    (torch.bfloat16, 128, False, (2, 8, 2, 200, 136, "bhnd"), None, 0.5),  # grouped KV heads
    (torch.bfloat16, 128, "top_left", (2, 8, 2, 384, 384, "bhnd"), None, 0.1),  # folded causal
    (torch.bfloat16, 128, "top_left", (1, 4, 4, 256, 256, "bnhd"), "t5", 0.1),  # bias by TMA
    (torch.bfloat16, 128, False, (2, 8, 2, 256, 136, "bhnd"), "head", 0.25),  # TMA bias, grouped
    (torch.float16, 128, "top_left", (2, 3, 3, 200, 264, "bhnd"), "full_nograd", 0.15),  # trimmed keys
    (torch.bfloat16, 64, False, (2, 3, 3, 256, 256, "bhnd"), None, 0.1),
    (torch.float16, 64, "top_left", (2, 8, 2, 384, 384, "bnhd"), None, 0.3),  # folded causal
    (torch.bfloat16, 64, "bottom_right", (1, 2, 2, 136, 200, "bhnd"), "full", 0.2),  # bias gradient
    (torch.float16, 64, False, (2, 8, 2, 200, 136, "bhnd"), "head_nograd", 0.1),  # grouped
    (torch.bfloat16, 256, False, (2, 8, 2, 200, 136, "bhnd"), None, 0.5),  # grouped KV heads
    (torch.float16, 256, "top_left", (2, 8, 2, 384, 384, "bnhd"), None, 0.3),  # folded causal
    (torch.bfloat16, 256, "bottom_right", (1, 2, 2, 136, 200, "bhnd"), "full", 0.2),  # bias gradient
    (torch.bfloat16, 256, "top_left", (1, 4, 2, 256, 256, "bhnd"), "head", 0.1),  # grouped + causal, dbias
    (torch.float16, 256, False, (2, 8, 2, 200, 136, "bhnd"), "head_nograd", 0.1),  # grouped, bias read
]


def _drop_seed(gen):
    # Both words random and 64-bit (negative as int64), as the op's draws and users' seeds can be.
    return torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, generator=gen).cuda()


@pytest.mark.parametrize("dtype,d,causal,shape,kind,p", DROPOUT_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_dropout_forward_draws_the_triton_mask_and_the_backward_regenerates_it(cutlass, poisoned, dtype, d, causal,
                                                                                shape, kind, p):
    """The keep bits, read off runs with v = a block of the identity (out[i, c] = P[i, j] keep / (1 - p)
    for the block's key j = c + block start), against the Philox reference bit for bit; then out,
    lse and the backward's gradients (the CUTLASS backward's own redraw at head dim 128) against
    float64 attention with that mask."""
    from philox_mask import keep_mask
    from test_triton_kernels import _dense64, _masked_scores64, _rel

    b, hq, hkv, nq, nk, layout = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, d, causal, shape, kind, p)).encode()))
    q = _randn((b, hq, nq, d), dtype, gen, layout).cuda()
    k, v = (_randn((b, hkv, nk, d), dtype, gen, layout).cuda() for _ in range(2))
    bias_grad = bool(kind) and not kind.endswith("_nograd")
    bias = _make_bias(kind.removesuffix("_nograd"), b, hq, nq, nk, dtype, gen).cuda() if kind else None
    seed = _drop_seed(gen)
    inp = validate(q, k, v, bias, causal=causal, dropout_p=p)
    assert not cutlass.not_supported_reasons(inp), cutlass.not_supported_reasons(inp)
    assert cutlass.backward_kernel(inp) == "cutlass", cutlass.backward_reasons(inp)
    if kind:
        assert cutlass.bias_read(inp) == ("tma" if d == 128 else "softmax")
    want = keep_mask(seed, b, hq, nq, nk, p)
    visible = torch.isfinite(_masked_scores64(q, k, bias, causal, inp.scale))
    for start in range(0, nk, d):
        eye = torch.zeros(b, hkv, nk, d, dtype=dtype, device="cuda")
        cols = torch.arange(start, min(start + d, nk), device="cuda")
        eye[:, :, cols, cols - start] = 1
        out, _ = poisoned(cutlass.forward, validate(q, k, eye, bias, causal=causal, dropout_p=p), seed)
        got = out[..., : len(cols)] != 0
        seen = visible[..., start: start + d]
        assert torch.equal(got[seen], want[..., start: start + d][seen]), (
            f"keys {start}..: {(got[seen] != want[..., start: start + d][seen]).sum().item()} bits differ")
        assert not got[~seen].any()  # hidden scores add nothing, kept or not

    out, lse = poisoned(cutlass.forward, inp, seed)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    out64, lse64 = _dense64(*leaves, b64, causal, inp.scale, drop_keep=want, p=p)
    # lse is the undropped one (the op's contract; the backward needs it so)
    finite = torch.isfinite(lse64)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse.double()[finite], lse64.detach()[finite], rtol=0, atol=2e-3)
    dout = _randn(out.shape, dtype, gen).cuda()
    grads = poisoned(cutlass.backward, inp, seed, out, lse, dout, None, bias_grad)
    assert (grads[3] is not None) == bias_grad
    out64.backward(dout.double())
    bound = {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    refs = (out64.detach(), *(t.grad for t in leaves), b64.grad if bias_grad else None)
    for name, got, ref in zip(("out", "dq", "dk", "dv", "dbias"), (out, *grads), refs):
        if ref is None:
            continue
        assert torch.isfinite(got).all(), name
        assert _rel(got, ref) < bound, f"{name}: relative error {_rel(got, ref):.3g} > {bound}"


@pytest.mark.parametrize("d", [64, 128, 256])
def test_compiled_training_with_dropout_keeps_one_mask_for_both_passes(cutlass, d):
    """Under torch.compile the CUTLASS forward and backward with dropout are opaque ops, the backward
    fed the forward's seed: the gradients are those of the forward's mask."""
    import flash_inductor  # noqa: F401  (registers the op)
    from philox_mask import keep_mask
    from test_triton_kernels import _dense64

    gen = torch.Generator().manual_seed(17)
    q, k, v, dout = (_randn((2, 4, 256, d), torch.bfloat16, gen).cuda() for _ in range(4))
    seed = _drop_seed(gen)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    step = torch.compile(lambda q, k, v: torch.ops.flash.fwd(q, k, v, None, seed, 1, d ** -0.5, 0.1)[0],
                         dynamic=False)
    step(*leaves).backward(dout)
    inp = validate(q, k, v, causal=True, dropout_p=0.1)
    assert dispatch.select(inp).NAME == "cutlass" and cutlass.backward_kernel(inp) == "cutlass"
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, _ = _dense64(*ref, None, "top_left", d ** -0.5, drop_keep=keep_mask(seed, 2, 4, 256, 256, 0.1), p=0.1)
    out64.backward(dout.double())
    for name, got, want in zip(("dq", "dk", "dv"), (t.grad for t in leaves), (t.grad for t in ref)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 3e-2, f"{name}: {err:.3g}"


def test_cuda_graph_replays_of_the_opaque_dropout_forward_draw_fresh_masks(cutlass):
    """mode="reduce-overhead": the CUTLASS forward is an opaque op, so the graph draws its seed
    (the op's own draw, a host copy, would be captured as one fixed seed). Every replay's mask is
    new, and each output is the one its returned seed's mask gives."""
    from torch._dynamo.utils import counters

    import flash_inductor  # noqa: F401  (registers the op)
    from philox_mask import keep_mask
    from test_triton_kernels import _dense64, _rel

    gen = torch.Generator().manual_seed(23)
    q, k, v = (_randn((1, 2, 256, 128), torch.bfloat16, gen).cuda() for _ in range(3))
    assert dispatch.select(validate(q, k, v, dropout_p=0.3)).NAME == "cutlass"
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda q, k, v: torch.ops.flash.fwd(q, k, v, None, None, 0, 128 ** -0.5, 0.3),
                         mode="reduce-overhead")
    runs = []
    for _ in range(4):  # warm-up, record, replays
        torch.compiler.cudagraph_mark_step_begin()
        out, _, rng = step(q, k, v)
        runs.append((out.clone(), rng.clone()))
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert len({tuple(rng.tolist()) for _, rng in runs}) == 4
    for out, rng in runs[2:]:
        want, _ = _dense64(q.double(), k.double(), v.double(), None, False, 128 ** -0.5,
                           drop_keep=keep_mask(rng, 1, 2, 256, 256, 0.3), p=0.3)
        assert _rel(out, want) < 2e-2


def test_misaligned_and_scaled_input_is_copied_not_refused(cutlass, poisoned):
    gen = torch.Generator().manual_seed(3)
    flat = torch.randn(1 + 2 * 4 * 128 * 128, generator=gen).to(torch.bfloat16).cuda()
    q = flat[1:].view(2, 4, 128, 128)  # data_ptr 2 bytes past a 16-byte boundary
    k, v = (_randn((2, 4, 128, 128), torch.bfloat16, gen).cuda() for _ in range(2))
    inp = validate(q, k, v, scale=0.3)
    assert not cutlass.not_supported_reasons(inp)
    out, lse = poisoned(cutlass.forward, inp, None)
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 0.3, -1) @ v.double()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    torch.testing.assert_close(lse.double(), torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 0.3, -1),
                               rtol=0, atol=2e-3)


def test_dispatch_prefers_cutlass_and_explains_refusals(cutlass):
    q = torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16)
    assert dispatch.select(validate(q, q, q, causal=True)).NAME == "cutlass"
    q200, k200 = (torch.randn(1, h, 200, 128, device="cuda", dtype=torch.bfloat16) for h in (4, 2))
    chosen, why = dispatch.explain_choice(validate(q200, k200, k200, causal=True))
    assert chosen == "triton" and "causal with grouped KV heads needs len_q = len_k, a multiple of 128" in why
    assert dispatch.select(validate(q200, k200, k200)).NAME == "cutlass"
    chosen, why = dispatch.explain_choice(validate(q, q, q, torch.zeros(256, 256, device="cuda", dtype=q.dtype)))
    assert chosen == "triton" and "a mask-like bias (one for every head)" in why
    assert dispatch.select(validate(q, q, q, torch.zeros(4, 256, 256, device="cuda", dtype=q.dtype))).NAME == "cutlass"


def test_head_dim_64_runs_on_cutlass_from_its_size_floor(cutlass, monkeypatch):
    """Short head-dim-64 attention stays with Triton (its kernels in Inductor's graph); from
    D64_MIN_SCORES scores up both passes are CUTLASS's, and the result matches Triton's."""
    from flash_inductor.backends import cutlass as module

    monkeypatch.setattr(module, "D64_MIN_SCORES", 2**28)
    dispatch.clear_choices()
    q64 = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    chosen, why = dispatch.explain_choice(validate(q64, q64, q64))
    assert chosen == "triton" and "head_dim=64 with B*H*Nq*Nk = 262144 < 2^28 scores" in why
    gen = torch.Generator().manual_seed(64)
    q, k, v = (_randn((1, 16, 4096, 64), torch.bfloat16, gen).cuda() for _ in range(3))
    inp = validate(q, k, v, causal=True)
    assert dispatch.select(inp).NAME == "cutlass" and cutlass.backward_kernel(inp) == "cutlass"
    out, lse = cutlass.forward(inp, None)
    want, want_lse = TritonBackend().forward(inp, None)
    assert ((out.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=2e-3)
    dispatch.clear_choices()


@pytest.mark.parametrize("d", [64, 128, 256])
def test_compiled_training_runs_the_backward_dispatch_picks(cutlass, d):
    """Under torch.compile the CUTLASS forward is one opaque op, and so is the CUTLASS backward
    (every head dim); the gradients match float64 attention."""
    import flash_inductor
    from test_kernels_in_graph import _aot_graphs

    gen = torch.Generator().manual_seed(11)
    q, k, v, dout = (_randn((1, 4, 384, d), torch.bfloat16, gen).cuda() for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, graphs = _aot_graphs(lambda q, k, v: flash_inductor.attention(q, k, v, causal=True), *leaves)
    out.backward(dout)
    fw, bw = (g.code for g in graphs)
    assert "torch.ops.flash.fwd.default" in fw and "triton_kernel_wrapper" not in fw
    assert "torch.ops.flash.bwd" in bw and "triton_kernel_wrapper" not in bw
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = flash_inductor.attention_ref(*ref_leaves, causal=True)
    ref.backward(dout.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in leaves)),
                               (ref, *(t.grad for t in ref_leaves))):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 2e-2, f"{name}: {err:.3g}"
