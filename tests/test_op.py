"""The op's contract (DESIGN.md, "The op"), on CPU through the default dispatch (the reference
backend): values and gradients, fully masked rows, dropout, lse, the registered ops (`opcheck`),
torch.compile, input validation, kernel dispatch and the seed's `FlashAttentionFunction`.

Accuracy, as in FlashAttention's tests: against `attention_ref` on float64 copies, the op's
relative error ‖x − ref‖ / ‖ref‖ may be at most 2x the error `attention_ref` itself makes in the
inputs' dtype, plus a small floor. Several cases shrink the reference's KEY_CHUNK to 16 so the
online softmax (and the dropout masks) cross several key chunks.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import flash_inductor
from conftest import make_qkv, rel_err
from flash_inductor import attention, attention_ref, attention_with_lse, dispatch, reference
from flash_inductor.dispatch import NoKernelError
from flash_inductor.inputs import validate

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Added to 2x attention_ref's own error: float32 rounding (dbias of a single query row, Nq=1,
# measured 2.1e-6 here: its few terms cancel), and one rounding of the result for the 16-bit
# types (bf16 eps 7.8e-3, fp16 eps 9.8e-4).
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}
# float32 arithmetic against float64 (METHOD.md: far under 1e-3); for the checks below that
# compare float32 results with no low-precision reference to scale from.
FP32_BOUND = 1e-5


@pytest.fixture(autouse=True, params=["auto", "reference"])
def default_dispatch(request, monkeypatch):
    """Every test twice on CPU: with automatic dispatch (PyTorch's fused CPU kernel, aten_cpu,
    where it accepts the input, else the reference) and with the reference forced. No Triton
    interpreter. A per-test seed makes every case draw its own inputs, reproducibly."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(flash_inductor.config, "kernel", None if request.param == "auto" else request.param)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return request.param


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(reference, "KEY_CHUNK", 16)


def _chunk(monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(reference, "KEY_CHUNK", chunk)


# ---- forward and backward against float64 ------------------------------------------------------


def _run(fn, tensors, dtype, dout):
    """fn(*copies) in `dtype` (bool masks kept), backward with dout; returns {name: tensor}."""
    copies = {}
    for name, t in tensors.items():
        if t is None or t.dtype == torch.bool:
            copies[name] = t
        else:
            copies[name] = t.detach().to(dtype).requires_grad_(t.requires_grad)
    out = fn(**copies)
    out.backward(dout.to(out.dtype))
    result = {"out": out}
    for name, t in copies.items():
        if t is not None and t.requires_grad:
            result["d" + name] = t.grad
    return result


def check_against_float64(q, k, v, bias=None, **kwargs):
    """attention vs float64 attention_ref, forward and every gradient, with the dtype's bound."""
    dtype = q.dtype
    tensors = {"q": q, "k": k, "v": v, "bias": bias}
    out_shape = (*q.shape[:3], v.shape[3])
    dout = torch.randn(out_shape, dtype=torch.float64)
    got = _run(lambda **t: attention(**t, **kwargs), tensors, dtype, dout)
    ref_low = _run(lambda **t: attention_ref(**t, **kwargs), tensors, dtype, dout)
    ref64 = _run(lambda **t: attention_ref(**t, **kwargs), tensors, torch.float64, dout)
    assert set(got) == set(ref64)
    for name in ref64:
        assert got[name].dtype == (bias.dtype if name == "dbias" else dtype), name
        assert got[name].shape == ref64[name].shape, name
        err = rel_err(got[name], ref64[name])
        bound = 2 * rel_err(ref_low[name], ref64[name]) + FLOOR[dtype]
        assert err <= bound, f"{name}: rel. error {err:.3g} > bound {bound:.3g} ({dtype})"


SHAPES = {
    # name: (B, Hq, Hkv, Nq, Nk, D, Dv)
    "odd_lengths": (2, 2, 2, 37, 45, 16, 16),
    "nq_1": (2, 2, 2, 1, 45, 59, 59),
    "nq_gt_nk": (2, 2, 2, 45, 37, 16, 16),
    "d59": (1, 2, 2, 37, 45, 59, 59),
    "d128": (1, 2, 2, 37, 45, 128, 128),
    "d256": (1, 2, 2, 19, 33, 256, 256),
    "dv_lt_d": (2, 2, 2, 37, 45, 59, 16),
    "dv_gt_d": (2, 2, 2, 37, 45, 16, 128),
    "gqa_4_2": (2, 4, 2, 37, 45, 16, 16),
    "mqa_4_1": (2, 4, 1, 37, 45, 16, 16),
}


@pytest.mark.parametrize("chunk", [None, 16], ids=["one_chunk", "chunk16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_shapes(shape, dtype, chunk, monkeypatch):
    _chunk(monkeypatch, chunk)
    b, hq, hkv, nq, nk, d, dv = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dv, dtype=dtype, requires_grad=True)
    check_against_float64(q, k, v)


BIAS_SHAPES = {
    "full": lambda b, h, nq, nk: (b, h, nq, nk),
    "per_head": lambda b, h, nq, nk: (1, h, nq, nk),
    "padding": lambda b, h, nq, nk: (b, 1, 1, nk),
    "2d": lambda b, h, nq, nk: (nq, nk),
    "1d": lambda b, h, nq, nk: (nk,),
}


def make_bias(kind, shape, dtype):
    """A float bias that requires grad, or a bool keep-mask keeping ~80% of the keys."""
    if kind == "bool":
        return torch.rand(shape) < 0.8
    return torch.randn(shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("bias_shape", BIAS_SHAPES.values(), ids=BIAS_SHAPES.keys())
def test_bias(bias_shape, kind, dtype, small_chunks):
    b, hq, hkv, nq, nk = 2, 4, 2, 37, 45
    q, k, v = make_qkv(b, hq, hkv, nq, nk, 16, dtype=dtype, requires_grad=True)
    bias = make_bias(kind, bias_shape(b, hq, nq, nk), dtype)
    check_against_float64(q, k, v, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_expanded_view(dtype, small_chunks):
    """A stride-0 expanded bias (never materialised by the caller); its grad reaches the base."""
    b, hq, nq, nk = 2, 2, 37, 45
    q, k, v = make_qkv(b, hq, hq, nq, nk, 16, dtype=dtype, requires_grad=True)
    base = torch.randn(b, 1, 1, nk, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(b, hq, nq, 16, dtype=torch.float64)
    grads = {}
    for name, fn, dt in (
        ("got", attention, dtype),
        ("low", attention_ref, dtype),
        ("ref", attention_ref, torch.float64),
    ):
        base_c = base.detach().to(dt).requires_grad_()
        bias = base_c.expand(b, hq, nq, nk)
        assert bias.stride()[1:3] == (0, 0)
        out = fn(q.detach().to(dt), k.detach().to(dt), v.detach().to(dt), bias)
        out.backward(dout.to(dt))
        grads[name] = (out, base_c.grad)
    for i, what in enumerate(("out", "dbias")):
        err = rel_err(grads["got"][i], grads["ref"][i])
        bound = 2 * rel_err(grads["low"][i], grads["ref"][i]) + FLOOR[dtype]
        assert err <= bound, f"{what}: {err:.3g} > {bound:.3g}"


LENGTHS = {"nq_lt_nk": (37, 45), "nq_gt_nk": (45, 37), "nq_1": (1, 45), "square": (45, 45)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_kind", ["none", "float", "bool"])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
def test_causal(causal, lengths, bias_kind, dtype, small_chunks):
    nq, nk = lengths
    b, hq, hkv = 2, 4, 2
    q, k, v = make_qkv(b, hq, hkv, nq, nk, 16, dtype=dtype, requires_grad=True)
    bias = None if bias_kind == "none" else make_bias(bias_kind, (1, hq, nq, nk), dtype)
    check_against_float64(q, k, v, bias, causal=causal)


def test_causal_spellings_agree():
    q, k, v = make_qkv(1, 2, 2, 7, 11, 8)
    for same in ((True, "top_left", "TOP_LEFT", 1), ("bottom_right", 2)):
        outs = [attention(q, k, v, causal=c) for c in same]
        assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(attention(q, k, v, causal=False), attention(q, k, v, causal="none"))
    assert not torch.equal(attention(q, k, v, causal=True), attention(q, k, v, causal="bottom_right"))


def test_explicit_scale(small_chunks):
    q, k, v = make_qkv(2, 2, 2, 37, 45, 16, requires_grad=True)
    check_against_float64(q, k, v, scale=0.37)


# ---- fully masked rows -----------------------------------------------------------------------


def _masked_rows_case(source):
    """(q, k, v, bias, causal, mask of rows [B, Hq, Nq] that see no key)."""
    b, hq, nq, nk = 2, 2, 9, 20
    if source == "bottom_right":
        nq, nk = 20, 9
    q, k, v = make_qkv(b, hq, hq, nq, nk, 16, requires_grad=True)
    empty = torch.zeros(b, hq, nq, dtype=torch.bool)
    bias, causal = None, False
    if source == "bool_mask":
        bias = torch.rand(b, hq, nq, nk) < 0.7
        bias[0, 1, 3] = False
        bias[1, :, 0] = False
        empty = ~bias.any(-1)
    elif source == "neg_inf_bias":
        bias = torch.randn(b, 1, nq, nk)
        bias[:, :, 4] = float("-inf")
        bias[1, 0, 5, ::2] = float("-inf")  # partly -inf: still a normal row
        bias.requires_grad_()
        empty[:, :, 4] = True
    elif source == "finfo_min_bias":
        # HF's masks: finfo.min (and anything <= MASKED_BIAS) masks the key like -inf.
        bias = torch.randn(b, 1, nq, nk)
        bias[:, :, 2] = torch.finfo(torch.float32).min
        bias[0, :, 6] = -1e30
        bias[1, 0, 5, ::2] = torch.finfo(torch.float32).min  # partly masked: a normal row
        bias.requires_grad_()
        empty[:, :, 2] = True
        empty[0, :, 6] = True
    else:
        causal = "bottom_right"
        empty[:, :, : nq - nk] = True
    return q, k, v, bias, causal, empty


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_layouts(dtype):
    """q as a [B, N, H, D] tensor transposed, k as Xᵀ of an [B, H, D, N] tensor (last dim not
    unit-stride), v with a padded last dim: every backend must read them through their strides
    (PyTorch's CPU kernel does not, so aten_cpu copies them)."""
    b, h, nq, nk, d = 2, 4, 13, 11, 16
    q = torch.randn(b, nq, h, d, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, h, d, nk, dtype=dtype).transpose(-1, -2).requires_grad_()
    v = torch.randn(b, h, nk, 2 * d, dtype=dtype)[..., ::2].requires_grad_()
    bias = torch.randn(b, h, nk, nq, dtype=dtype).transpose(-1, -2)
    check_against_float64(q, k, v, bias, causal=True)


def test_outputs_and_gradients_follow_the_input_layout(monkeypatch):
    """q, k, v as HF models hand them over ([B, N, H, D] viewed as [B, H, N, D]): out comes back
    in that layout and so do dq, dk, dv, so `out.transpose(1, 2).reshape(B, N, H·D)` is a view
    (no copy kernel per layer); contiguous inputs keep contiguous results. An unused lse reaches
    the backward as None, not as a zeros tensor to fill and read."""
    import flash_inductor.ops as ops

    seen = {}
    real_bwd = ops.bwd

    def recording_bwd(dout, dlse, *args):
        seen["dlse"] = dlse
        return real_bwd(dout, dlse, *args)

    monkeypatch.setattr(ops, "bwd", recording_bwd)
    b, h, n, d = 2, 3, 9, 8
    q, k, v = (torch.randn(b, n, h, d).transpose(1, 2).requires_grad_() for _ in range(3))
    out = attention(q, k, v, causal=True)
    assert out.transpose(1, 2).is_contiguous()
    out.sum().backward()
    assert seen["dlse"] is None
    for t in (q, k, v):
        assert t.grad.stride() == t.stride(), t.grad.stride()
    assert rel_err(out, attention_ref(q.double(), k.double(), v.double(), causal=True)) < 1e-5
    c = torch.randn(b, h, n, d)
    assert attention(c, c, c).is_contiguous()


SOFTCAP_CASES = {
    # name: (shape (B, Hq, Hkv, Nq, Nk, D), causal, bias shape or None, cap)
    "plain_cap_small": ((2, 2, 2, 37, 45, 16), False, None, 0.5),
    "gqa_causal_bias_grad": ((2, 4, 2, 37, 45, 16), "top_left", (1, 4, 37, 45), 5.0),
    "bottom_right_bool_mask": ((1, 2, 1, 45, 37, 32), "bottom_right", "bool", 2.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SOFTCAP_CASES.values(), ids=SOFTCAP_CASES.keys())
def test_softcap_against_float64(case, dtype, small_chunks):
    (b, hq, hkv, nq, nk, d), causal, bias_shape, cap = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=dtype, requires_grad=True)
    bias = None
    if bias_shape == "bool":
        bias = torch.rand(b, 1, nq, nk) > 0.3
    elif bias_shape is not None:
        bias = torch.randn(bias_shape, dtype=dtype, requires_grad=True)
    check_against_float64(q, k, v, bias, causal=causal, softcap=cap, scale=0.7)


def test_softcap_is_gemma2s_formula():
    """Independent of attention_ref: softmax(c·tanh(scale·q·kᵀ / c) + bias) · v, and its
    gradients, written out densely in float64 (the cap is applied before the bias)."""
    q, k, v = make_qkv(2, 2, 2, 19, 23, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 19, 23, dtype=torch.float64, requires_grad=True)
    cap, scale = 0.8, 0.3
    out = attention(q, k, v, bias, softcap=cap, scale=scale)
    s = cap * torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / cap) + bias
    ref = torch.softmax(s, -1) @ v
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), dout)
    want = torch.autograd.grad(ref, (q, k, v, bias), dout)
    assert rel_err(out, ref) < 1e-12
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12


def test_softcap_is_declared_by_each_backend():
    """Triton takes soft-capping; the CUTLASS and ATen CPU kernels refuse it, by name."""
    q, k, v = make_qkv(1, 2, 2, 5, 6, 8)
    reasons = dispatch.reasons_by_backend(validate(q, k, v, softcap=30.0))
    assert not any("softcap" in r for r in reasons["triton"])
    for name in ("cutlass", "aten_cpu"):
        assert any("softcap=30 (logit soft-capping is not in this kernel yet)" in r for r in reasons[name]), name
    assert reasons["reference"] == []


@pytest.mark.parametrize("source", ["bool_mask", "neg_inf_bias", "finfo_min_bias", "bottom_right"])
def test_fully_masked_rows(source, small_chunks):
    q, k, v, bias, causal, empty = _masked_rows_case(source)
    assert empty.any() and not empty.all()
    out, lse = attention_with_lse(q, k, v, bias, causal=causal)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(lse[empty], torch.full_like(lse[empty], float("-inf")))
    assert torch.isfinite(out).all() and torch.isfinite(lse[~empty]).all()

    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v) + ((bias,) if bias is not None and bias.requires_grad else ()):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[empty], torch.zeros_like(q.grad[empty]))
    if source == "neg_inf_bias":
        assert torch.equal(bias.grad[:, :, 4], torch.zeros_like(bias.grad[:, :, 4]))
    if source == "finfo_min_bias":
        assert torch.equal(bias.grad[:, :, 2], torch.zeros_like(bias.grad[:, :, 2]))

    for t in (q, k, v, bias):
        if t is not None and t.requires_grad:
            t.grad = None
    check_against_float64(q, k, v, bias, causal=causal)


# ---- dropout ---------------------------------------------------------------------------------


def test_dropout_follows_torch_manual_seed():
    q, k, v = make_qkv(2, 2, 2, 37, 45, 16)
    torch.manual_seed(1234)
    a = attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(1234)
    b = attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(4321)
    c = attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, attention(q, k, v))


def test_dropout_explicit_seed_tensor():
    q, k, v = make_qkv(2, 2, 2, 37, 45, 16)
    scale = 0.25
    seed = torch.tensor([11, 22])
    out1, _, rng1 = torch.ops.flash.fwd(q, k, v, None, seed, 0, scale, 0.3)
    out2, _, rng2 = torch.ops.flash.fwd(q, k, v, None, seed.clone(), 0, scale, 0.3)
    out3, _, _ = torch.ops.flash.fwd(q, k, v, None, torch.tensor([11, 23]), 0, scale, 0.3)
    assert torch.equal(rng1, seed) and torch.equal(rng2, seed)
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)


DROPOUT_CASES = {
    # name: (p, KEY_CHUNK, bias kind, causal)
    "p0.1": (0.1, None, "none", False),
    "p0.5_chunk16": (0.5, 16, "none", False),
    "p0.3_bias_causal_chunk16": (0.3, 16, "float", "top_left"),
}


@pytest.mark.parametrize("case", DROPOUT_CASES.values(), ids=DROPOUT_CASES.keys())
def test_dropout_mask_fraction_and_gradients(case, monkeypatch):
    """v = [identity | random] makes out[..., :Nk] = P ∘ keep / (1 - p): the keep-mask is
    recovered from the output, its zero fraction is p, and the forward and every gradient match a
    dense float64 computation that applies the recovered mask."""
    p, chunk, bias_kind, causal = case
    _chunk(monkeypatch, chunk)
    b, hq, hkv, nq, nk, d, extra = 2, 4, 2, 64, 48, 32, 8
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, d)
    eye = torch.eye(nk).expand(b, hkv, nk, nk)
    v = torch.cat([eye, torch.randn(b, hkv, nk, extra)], dim=-1)
    bias = None if bias_kind == "none" else make_bias(bias_kind, (1, hq, nq, nk), torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = attention(q, k, v, bias, causal=causal, dropout_p=p)

    prob64 = attention_ref(q.double(), k.double(), eye.double(), None if bias is None else bias.double(), causal=causal)
    visible = prob64 > 0
    keep = out[..., :nk].detach() != 0
    assert not (keep & ~visible).any()
    n = int(visible.sum())
    dropped = float((~keep & visible).sum()) / n
    assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / n), f"dropped {dropped:.4f}, p={p}"

    # Dense float64 attention with the recovered mask, through autograd.
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if bias is not None:
        ref_leaves.append(bias.detach().double().requires_grad_())
        leaves.append(bias)
    q64, k64, v64 = ref_leaves[:3]
    g = hq // hkv
    s = q64 @ k64.repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        s = s + ref_leaves[3]
    if causal:
        rows = torch.arange(nq)[:, None]
        s = s.masked_fill(torch.arange(nk)[None, :] > rows, float("-inf"))
    probs = torch.softmax(s, -1) * keep / (1 - p)
    ref = probs @ v64.repeat_interleave(g, 1)
    assert rel_err(out, ref) <= FP32_BOUND

    dout = torch.randn_like(ref)
    out.backward(dout.float())
    ref.backward(dout)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), leaves, ref_leaves):
        err = rel_err(got.grad, want.grad)
        assert err <= FP32_BOUND, f"{name}: {err:.3g}"


# ---- lse -------------------------------------------------------------------------------------


def _scores64(q, k, bias, causal, scale):
    """Scaled, biased, masked scores [B, Hq, Nq, Nk] in float64 autograd."""
    g = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scale
    keep = None
    if bias is not None:
        if bias.dtype == torch.bool:
            keep = bias
        else:
            s = s + bias
    if causal:
        nq, nk = s.shape[-2:]
        shift = nk - nq if causal == "bottom_right" else 0
        c = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + shift
        keep = c if keep is None else keep & c
    return s if keep is None else s.masked_fill(~keep, float("-inf"))


LSE_CASES = {
    "plain": ("none", False),
    "float_bias_top_left": ("float", "top_left"),
    "bool_bottom_right": ("bool", "bottom_right"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LSE_CASES.values(), ids=LSE_CASES.keys())
def test_lse_value(case, dtype, small_chunks):
    bias_kind, causal = case
    b, hq, hkv, nq, nk, d = 2, 4, 2, 37, 45, 16
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=dtype)
    bias = None if bias_kind == "none" else make_bias(bias_kind, (b, 1, nq, nk), dtype)
    _, lse = attention_with_lse(q, k, v, bias, causal=causal)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, nq)
    bias64 = bias if bias is None or bias.dtype == torch.bool else bias.detach().double()
    want = torch.logsumexp(_scores64(q.double(), k.double(), bias64, causal, 1 / math.sqrt(d)), -1)
    # The inputs are exact in float32, so only float32 arithmetic separates lse from want.
    assert rel_err(lse, want) <= FP32_BOUND


@pytest.mark.parametrize("case", LSE_CASES.values(), ids=LSE_CASES.keys())
def test_lse_gradient(case, small_chunks):
    """d(out·g + lse·h) against float64 autograd of attention_ref and logsumexp."""
    bias_kind, causal = case
    b, hq, hkv, nq, nk, d = 2, 4, 2, 37, 45, 16
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, requires_grad=True)
    bias = None if bias_kind == "none" else make_bias(bias_kind, (b, 1, nq, nk), torch.float32)
    leaves = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    bias64 = ref_leaves[3] if len(ref_leaves) == 4 else bias
    g_out = torch.randn(b, hq, nq, d, dtype=torch.float64)
    g_lse = torch.randn(b, hq, nq, dtype=torch.float64)

    out, lse = attention_with_lse(q, k, v, bias, causal=causal)
    ((out * g_out.float()).sum() + (lse * g_lse.float()).sum()).backward()
    out64 = attention_ref(*ref_leaves[:3], bias64, causal=causal)
    lse64 = torch.logsumexp(_scores64(*ref_leaves[:2], bias64, causal, 1 / math.sqrt(d)), -1)
    ((out64 * g_out).sum() + (lse64 * g_lse).sum()).backward()
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), leaves, ref_leaves):
        err = rel_err(got.grad, want.grad)
        assert err <= FP32_BOUND, f"{name}: {err:.3g}"


@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_gradcheck_out_and_lse(causal):
    """Finite differences on float64 inputs, through both outputs of attention_with_lse."""
    q, k, v = make_qkv(1, 2, 1, 5, 7, 4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, bias: attention_with_lse(q, k, v, bias, causal=causal), (q, k, v, bias)
    )


# ---- the registered ops ----------------------------------------------------------------------

OPCHECK_CASES = {
    # name: (Hq, Hkv, bias kind, causal, dropout_p, softcap)
    "plain": (2, 2, "none", 0, 0.0, 0.0),
    "float_bias_top_left_gqa": (4, 2, "float", 1, 0.0, 0.0),
    "bool_bottom_right_gqa": (4, 2, "bool", 2, 0.0, 0.0),
    "float_bias_mqa_dropout": (4, 1, "float", 2, 0.2, 0.0),
    "dropout": (2, 2, "none", 0, 0.2, 0.0),
    "softcap_float_bias_causal": (4, 2, "float", 1, 0.0, 3.0),
}


def _opcheck_inputs(hq, hkv, bias_kind, causal, dropout_p, softcap):
    b, nq, nk, d = 2, 7, 11, 8
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, requires_grad=True)
    bias = None if bias_kind == "none" else make_bias(bias_kind, (b, 1, nq, nk), torch.float32)
    seed = torch.tensor([5, 7]) if dropout_p > 0 else None
    return q, k, v, bias, seed, causal, 1 / math.sqrt(d), dropout_p, softcap


@pytest.mark.parametrize("case", OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys())
def test_opcheck_fwd(case):
    torch.library.opcheck(torch.ops.flash.fwd.default, _opcheck_inputs(*case))


@pytest.mark.parametrize("with_dlse", [False, True], ids=["no_dlse", "dlse"])
@pytest.mark.parametrize("case", OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys())
def test_opcheck_bwd(case, with_dlse):
    q, k, v, bias, seed, causal, scale, p, softcap = _opcheck_inputs(*case)
    out, lse, rng = torch.ops.flash.fwd(q, k, v, bias, seed, causal, scale, p, softcap)
    # The backward is not itself differentiable: opcheck gets inputs that do not require grad.
    q, k, v, out, lse = (t.detach() for t in (q, k, v, out, lse))
    bias_requires_grad = bias is not None and bias.requires_grad
    bias = None if bias is None else bias.detach()
    dlse = torch.randn_like(lse) if with_dlse else None
    args = (torch.randn_like(out), dlse, q, k, v, bias, rng, out, lse, causal, scale, p, bias_requires_grad, softcap)
    torch.library.opcheck(torch.ops.flash.bwd.default, args)
    dbias = torch.ops.flash.bwd(*args)[3]
    assert dbias.shape == (bias.shape if bias_requires_grad else (0,))


# ---- torch.compile ---------------------------------------------------------------------------


def _model(q, k, v, bias):
    out, lse = attention_with_lse(q, k, v, bias, causal="bottom_right")
    return out.sin() * 2 + lse.unsqueeze(-1).exp()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(backend, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(_model, backend=backend, dynamic=dynamic, fullgraph=True)
    # Two shapes: with dynamic=True the second runs through the same symbolic graph.
    for nq, nk in ((13, 21), (17, 29))[: 2 if dynamic else 1]:
        q, k, v = make_qkv(2, 4, 2, nq, nk, 16, requires_grad=True)
        bias = torch.randn(2, 1, nq, nk, requires_grad=True)
        dout = torch.randn(2, 4, nq, 16)
        results = []
        for fn in (_model, compiled):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
            out = fn(*leaves)
            out.backward(dout)
            results.append([out] + [t.grad for t in leaves])
        for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), results[1], results[0]):
            assert rel_err(got, want) <= FP32_BOUND, name


# ---- input validation ------------------------------------------------------------------------


def _bad(**changes):
    """Valid arguments (B=2, Hq=4, Hkv=2, Nq=5, Nk=6, D=8) with some replaced."""
    q, k, v = make_qkv(2, 4, 2, 5, 6, 8)
    args = dict(q=q, k=k, v=v, bias=None)
    for name, fn in changes.items():
        args[name] = fn(args[name]) if callable(fn) else fn
    kwargs = {n: args.pop(n) for n in ("causal", "scale", "dropout_p", "softcap") if n in args}
    return (args["q"], args["k"], args["v"], args["bias"]), kwargs


BAD_INPUTS = {
    "rank": (dict(q=lambda q: q[0]), r"q must be 4-D .* got shape \(4, 5, 8\)"),
    "batch": (dict(k=lambda k: k[:1], v=lambda v: v[:1]), r"batch sizes differ.*dim 0 must match"),
    "heads_not_multiple": (
        dict(q=lambda q: q[:, :3]),
        r"q has 3 heads and k/v have 2: the query heads must be a multiple",
    ),
    "dtype_mix": (dict(k=lambda k: k.half()), r"q, k and v must share one dtype.*k=torch.float16"),
    "int_dtype": (
        dict(q=lambda q: q.long(), k=lambda k: k.long(), v=lambda v: v.long()),
        r"q.dtype=torch.int64 is not supported \(supported: float16",
    ),
    "head_dim_300": (
        dict(q=lambda q: torch.randn(2, 4, 5, 300), k=lambda k: torch.randn(2, 2, 6, 300)),
        r"head_dim=300 exceeds the limit 256",
    ),
    "v_head_dim_300": (dict(v=lambda v: torch.randn(2, 2, 6, 300)), r"v head_dim=300 exceeds the limit 256"),
    "bias_broadcast": (
        dict(bias=torch.randn(5, 5)),
        r"bias of shape \(5, 5\) does not broadcast to .*\[2, 4, 5, 6\]",
    ),
    "bias_int": (dict(bias=torch.ones(5, 6, dtype=torch.int64)), r"bias.dtype=torch.int64 is not supported"),
    "dropout_p_1": (dict(dropout_p=1.0), r"dropout_p=1.0 must be in \[0, 1\)"),
    "dropout_p_negative": (dict(dropout_p=-0.1), r"dropout_p=-0.1 must be in \[0, 1\)"),
    "causal_diagonal": (dict(causal="diagonal"), r"causal='diagonal' is not understood \(accepted: .*'bottom_right'"),
    "scale_inf": (dict(scale=float("inf")), r"scale=inf must be finite"),
    "scale_nan": (dict(scale=float("nan")), r"scale=nan must be finite"),
    "softcap_negative": (dict(softcap=-1.0), r"softcap=-1.0 must be a finite number > 0"),
    "softcap_inf": (dict(softcap=float("inf")), r"softcap=inf must be a finite number > 0"),
}


@pytest.mark.parametrize("entry", [attention, attention_with_lse, attention_ref], ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_value_error(bad, entry):
    changes, message = bad
    args, kwargs = _bad(**changes)
    with pytest.raises(ValueError, match=message):
        entry(*args, **kwargs)


# ---- dispatch --------------------------------------------------------------------------------


def _inputs():
    q, k, v = make_qkv(1, 2, 2, 5, 6, 8)
    return q, k, v, validate(q, k, v)


def _force(how, name, monkeypatch):
    if how == "env":
        monkeypatch.setattr(flash_inductor.config, "kernel", None)  # the setting outranks the env
        monkeypatch.setenv(dispatch.ENV_VAR, name)
    else:
        monkeypatch.setattr(flash_inductor.config, "kernel", name)


def test_default_dispatch_on_cpu(default_dispatch):
    if default_dispatch != "auto":
        pytest.skip("checks automatic dispatch")
    q, k, v, inp = _inputs()
    assert dispatch.select(inp).NAME == "aten_cpu"
    chosen, why_not_others = dispatch.explain_choice(inp)
    assert chosen == "aten_cpu"
    assert "triton: device=cpu (supported: cuda)" in why_not_others
    assert "cutlass: device=cpu (supported: cuda)" in why_not_others
    # What PyTorch's CPU kernel lacks falls through to the reference, with the reason.
    dropout = validate(q, k, v, dropout_p=0.1)
    chosen, why_not_others = dispatch.explain_choice(dropout)
    assert chosen == "reference" and "aten_cpu: dropout_p=0.1 (this kernel has no dropout)" in why_not_others


def test_dispatch_choice_is_cached_per_signature(default_dispatch, monkeypatch):
    """The automatic choice is computed once per input signature (shapes, strides, dtypes,
    alignment, arguments); a new signature asks the backends again, and fakes never hit the cache."""
    if default_dispatch != "auto":
        pytest.skip("checks automatic dispatch")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flash_inductor.backends.base import KernelBackend

    asked = []
    real = KernelBackend.not_supported_reasons

    def counted(self, inp, varlen=False):
        asked.append(self.NAME)
        return real(self, inp, varlen)

    monkeypatch.setattr(KernelBackend, "not_supported_reasons", counted)
    q, k, v, inp = _inputs()
    assert dispatch.select(inp).NAME == "aten_cpu" and asked
    asked.clear()
    assert dispatch.select(validate(*make_qkv(1, 2, 2, 5, 6, 8))).NAME == "aten_cpu"
    assert asked == []  # fresh tensors, same signature
    assert dispatch.select(validate(q, k, v, dropout_p=0.1)).NAME == "reference" and asked
    asked.clear()
    assert dispatch.select(validate(q.double(), k.double(), v.double())).NAME == "aten_cpu" and asked
    asked.clear()
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        for _ in range(2):
            assert dispatch.select(validate(fq, fk, fv)).NAME == "aten_cpu"
    assert len(asked) >= 2 * len(("cutlass", "triton", "aten_cpu"))


class _SeenOps(TorchDispatchMode):
    """Records the ops dispatched under it; being a mode, it also makes `attention` call the op."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_unobserved_eager_calls_skip_the_op_layers(monkeypatch):
    """Plain tensors run the op's body directly, and with autograd its registered autograd as a
    plain autograd.Function (torch.library's Python layers were 45% of a no_grad call and two
    thirds of one that records autograd). A dispatch mode or the profiler go through the op, and
    the results are the same either way."""
    from flash_inductor import ops

    calls = []
    real = ops.fwd
    monkeypatch.setattr(ops, "fwd", lambda *a: calls.append(1) or real(*a))
    q, k, v = make_qkv(2, 4, 2, 9, 11, 16)
    bias = torch.randn(2, 1, 9, 11)
    with torch.no_grad():
        fast = attention(q, k, v, bias, causal="bottom_right")
    assert calls == []
    assert torch.equal(fast, real(q, k, v, bias, None, 2, 0.25, 0.0)[0])
    with torch.no_grad(), _SeenOps() as seen:
        torch.testing.assert_close(attention(q, k, v, bias, causal="bottom_right"), fast, rtol=0, atol=0)
    assert calls and any("flash.fwd" in name for name in seen.ops)
    calls.clear()
    with torch.no_grad(), torch.profiler.profile() as prof:
        attention(q, k, v, bias, causal="bottom_right")
    assert calls and any("flash::fwd" in e.name for e in prof.events())


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_eager_autograd_without_the_op_matches_the_op(dropout_p):
    """`_EagerAttention` gives the gradients the op's registered autograd gives, d lse and a
    learned bias included, and dropout regenerates the forward's mask in both."""
    q, k, v = make_qkv(2, 4, 2, 9, 11, 16)
    bias = torch.randn(2, 1, 9, 11)

    def run(observed: bool):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        torch.manual_seed(7)
        with _SeenOps() if observed else contextlib.nullcontext() as seen:
            out, lse = attention_with_lse(*leaves, causal=True, dropout_p=dropout_p)
            (out * torch.linspace(-1, 1, out.shape[-1])).sum().add(lse.sum()).backward()
        assert observed == bool(seen and any("flash.fwd" in name for name in seen.ops))
        return out, lse, *(t.grad for t in leaves)

    for got, want in zip(run(False), run(True)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


HOW = ["env", "config"]


@pytest.mark.parametrize("how", HOW)
def test_force_reference(how, monkeypatch):
    q, k, v, inp = _inputs()
    _force(how, " Reference ", monkeypatch)
    assert dispatch.select(inp).NAME == "reference"
    assert dispatch.explain_choice(inp)[0] == "reference"
    assert torch.equal(attention(q, k, v), reference.forward(inp, None)[0])


@pytest.mark.parametrize("how", HOW)
def test_force_triton_on_cpu_raises(how, monkeypatch):
    q, k, v, inp = _inputs()
    _force(how, "triton", monkeypatch)
    message = r"FLASH_INDUCTOR_KERNEL=triton was forced .*device=cpu \(supported: cuda\); on CPU only under TRITON_INTERPRET=1"
    with pytest.raises(NoKernelError, match=message):
        attention(q, k, v)
    chosen, why = dispatch.explain_choice(inp)
    assert chosen == "none" and "device=cpu (supported: cuda)" in why


@pytest.mark.parametrize("how", HOW)
def test_force_cutlass_on_cpu_raises(how, monkeypatch):
    q, k, v, _ = _inputs()
    _force(how, "cutlass", monkeypatch)
    with pytest.raises(NoKernelError, match=r"FLASH_INDUCTOR_KERNEL=cutlass was forced .*device=cpu \(supported: cuda\)"):
        attention(q, k, v)


@pytest.mark.parametrize("how", HOW)
def test_force_unknown_kernel_raises(how, monkeypatch):
    q, k, v, _ = _inputs()
    _force(how, "bogus", monkeypatch)
    with pytest.raises(ValueError, match=r"'bogus' is not a kernel \(accepted: cutlass, triton, cutlass_sm80, aten_cpu, reference\)"):
        attention(q, k, v)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_runs_the_kernel_the_forward_was_forced_to(monkeypatch, compiled):
    """A kernel forced only around the forward (the setting is thread-local; the autograd engine
    may run the backward in another thread) still runs the backward: a dropout mask is its
    kernel's own, so another kernel's backward would be silently wrong."""
    from flash_inductor.backends.aten_cpu import AtenCpuBackend
    from flash_inductor.backends.reference import ReferenceBackend

    ran = []
    for cls in (ReferenceBackend, AtenCpuBackend):
        real = cls.backward
        monkeypatch.setattr(cls, "backward", lambda self, *a, _real=real, **kw: ran.append(self.NAME) or _real(self, *a, **kw))
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 5, 6, 8))
    fn = torch.compile(attention, backend="inductor", fullgraph=True) if compiled else attention
    monkeypatch.setattr(flash_inductor.config, "kernel", "reference")
    out = fn(q, k, v)
    flash_inductor.config.kernel = None
    out.sum().backward()
    assert ran == ["reference"]
    assert dispatch.select(validate(q, k, v)).NAME == "aten_cpu"  # what it would choose by itself


def test_op_arguments_never_collide_with_inductors_fallback_parameters():
    """Inductor lowers an opaque op with `FallbackKernel.create(kernel, *args, **kwargs)`, passing
    some op arguments by name: an argument called `kernel` failed CI's HF training tests (session 17)."""
    import inspect

    from torch._inductor.ir import FallbackKernel

    import flash_inductor.varlen  # noqa: F401  (registers flash::varlen_*)

    reserved = set(inspect.signature(FallbackKernel.create).parameters) - {"args", "kwargs"}
    for op in (torch.ops.flash.fwd, torch.ops.flash.bwd, torch.ops.flash.varlen_fwd, torch.ops.flash.varlen_bwd):
        names = {a.name for a in op.default._schema.arguments}
        assert not names & reserved, (op, names & reserved)


def test_config_overrides_env(monkeypatch):
    q, k, v, _ = _inputs()
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(flash_inductor.config, "kernel", "reference")
    attention(q, k, v)


# ---- the seed's FlashAttentionFunction -------------------------------------------------------

SEED_CASES = {
    "plain": (False, False, None),
    "bias": (True, False, None),
    "causal": (False, True, None),
    "bias_causal_scale": (True, True, 0.3),
}


@pytest.mark.parametrize("case", SEED_CASES.values(), ids=SEED_CASES.keys())
def test_seed_flash_attention_function(case, small_chunks):
    with_bias, causal, scale = case
    b, h, n, d = 2, 2, 37, 16
    q, k, v = make_qkv(b, h, h, n, n, d, requires_grad=True)
    bias = torch.randn(b, h, n, n, requires_grad=True) if with_bias else None
    leaves = [t for t in (q, k, v, bias) if t is not None]
    dout = torch.randn(b, h, n, d)

    if with_bias:
        out = flash_inductor.FlashAttentionFunction.apply(q, k, v, bias, causal, scale)
    elif causal:
        out = flash_inductor.FlashAttentionFunction.apply(q, k, v, None, causal)
    else:
        out = flash_inductor.FlashAttentionFunction.apply(q, k, v)
    out.backward(dout)
    got = [out] + [t.grad for t in leaves]

    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    mask = ref_leaves[3] if with_bias else None
    if causal:
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        mask = tril if mask is None else mask.masked_fill(~tril, float("-inf"))
    ref = F.scaled_dot_product_attention(*ref_leaves[:3], attn_mask=mask, scale=scale)
    ref.backward(dout)
    want = [ref] + [t.grad for t in ref_leaves]
    for name, g, w in zip(("out", "dq", "dk", "dv", "dbias"), got, want):
        assert rel_err(g, w) <= FP32_BOUND, name
