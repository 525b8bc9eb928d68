"""The CUTLASS sm_80 kernels (csrc/sm80_*.cuh, example 41's, built on first use) against float64
attention, on any GPU of compute capability >= 8.0 (on an H100 they run as sm_80 code).

The forward and its own backward on every head-dim bucket (64, 128, 256, and head dims between),
both dtypes, lengths off the tiles, Nq != Nk both ways, the [B, N, H, D] layout HF models pass,
grouped KV heads, both causal alignments; every bias layout with its gradient (per head, full,
permuted keys, broadcast, fully masked rows, bool masks, finfo.min padding masks) and the lse
gradient; dropout, whose backward must regenerate the forward's mask; packed variable-length
batches against the per-sequence reference. Outputs are poisoned (NaN) before each run.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import flash_inductor
from flash_inductor import dispatch, varlen
from flash_inductor.backends.cutlass_sm80 import CutlassSm80Backend
from flash_inductor.inputs import validate
from test_triton_kernels import _check_against_ref, _dense64, _rel, _randn, poisoned  # noqa: F401

SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not SM80, reason="needs a GPU of compute capability >= 8.0")]

# (B, Hq, Hkv, Nq, Nk, layout)
SHAPES = [(2, 3, 3, 200, 200, "bhnd"), (1, 2, 2, 77, 130, "bnhd"), (1, 4, 2, 130, 77, "bhnd")]
CASES = list(itertools.product((torch.float16, torch.bfloat16), (64, 128, 256), (False, "top_left"), SHAPES))
CASES += [
    (torch.bfloat16, 40, False, (2, 2, 2, 100, 90, "bhnd")),  # head dims between the buckets
    (torch.float16, 96, "top_left", (1, 3, 1, 129, 129, "bnhd")),
    (torch.bfloat16, 160, False, (1, 2, 2, 64, 300, "bhnd")),
    (torch.bfloat16, 128, "bottom_right", (2, 2, 2, 100, 260, "bhnd")),
    (torch.float16, 64, "bottom_right", (1, 4, 2, 33, 97, "bnhd")),
]


def _make_bias(kind, b, hq, nq, nk, dtype, gen):
    if kind == "head":
        return torch.randn(1, hq, nq, nk, generator=gen).to(dtype)
    if kind == "full":
        return torch.randn(b, hq, nq, nk, generator=gen).to(dtype)
    if kind == "t5":  # an embedding permuted to [1, H, Nq, Nk]: keys H apart
        return torch.randn(nq, nk, hq, generator=gen).to(dtype).permute(2, 0, 1)[None]
    if kind == "rows":  # rows with no visible key: zeros, lse -inf
        bias = torch.randn(1, hq, nq, nk, generator=gen).to(dtype)
        bias[:, :, 5:9] = float("-inf")
        bias[:, -1, 40:, 50:] = float("-inf")
        return bias
    if kind == "keys":
        return torch.randn(b, hq, 1, nk, generator=gen).to(dtype)
    if kind == "bool":
        keep = torch.rand(b, 1, nq, nk, generator=gen) > 0.3
        keep[:, :, 3] = False
        return keep
    if kind == "padding":  # HF's additive mask: finfo.min on the padded keys, a padding-only row
        mask = torch.zeros(b, 1, nq, nk)
        mask[0, :, :, nk - 17:] = torch.finfo(dtype).min
        mask[-1, :, 2, :] = torch.finfo(dtype).min
        return mask.to(dtype)
    raise ValueError(kind)


BIAS_CASES = [
    (torch.bfloat16, 64, False, (2, 3, 3, 200, 200, "bhnd"), "head"),
    (torch.float16, 128, "top_left", (1, 2, 2, 77, 130, "bnhd"), "full"),
    (torch.bfloat16, 256, "top_left", (1, 2, 2, 130, 77, "bhnd"), "head"),
    (torch.bfloat16, 128, False, (1, 4, 4, 100, 100, "bnhd"), "t5"),
    (torch.bfloat16, 64, False, (1, 2, 2, 128, 150, "bhnd"), "rows"),
    (torch.float16, 128, False, (2, 2, 2, 90, 131, "bhnd"), "keys"),
    (torch.bfloat16, 128, False, (2, 4, 2, 100, 80, "bhnd"), "bool"),
    (torch.bfloat16, 64, "top_left", (2, 4, 4, 96, 96, "bnhd"), "padding"),
    (torch.bfloat16, 128, "bottom_right", (1, 4, 2, 70, 200, "bhnd"), "head"),
]


@pytest.fixture(scope="module")
def sm80():
    from flash_inductor.backends import cutlass_sm80 as module

    saved = set(module.UNVALIDATED)
    module.UNVALIDATED.clear()  # these tests are the validation
    dispatch.clear_choices()
    lib, why = module._library()  # builds it: with the toolkit, curand and CUTLASS headers it must succeed
    assert lib is not None, why
    backend = CutlassSm80Backend()
    assert not backend.unavailable_reasons(torch.device("cuda"))
    yield backend
    module.UNVALIDATED.update(saved)
    dispatch.clear_choices()


def _seeded(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("dtype,d,causal,shape", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_forward_and_backward(sm80, poisoned, dtype, d, causal, shape):
    b, hq, hkv, nq, nk, layout = shape
    gen = _seeded(dtype, d, causal, shape)
    q = _randn((b, hq, nq, d), dtype, gen, layout).cuda()
    k, v = (_randn((b, hkv, nk, d), dtype, gen, layout).cuda() for _ in range(2))
    inp = validate(q, k, v, causal=causal)
    assert not sm80.not_supported_reasons(inp), sm80.not_supported_reasons(inp)
    _check_against_ref(sm80, poisoned, q, k, v, None, causal, gen)


@pytest.mark.parametrize("dtype,d,causal,shape,kind", BIAS_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_bias_and_its_gradient(sm80, poisoned, dtype, d, causal, shape, kind):
    b, hq, hkv, nq, nk, layout = shape
    gen = _seeded(dtype, d, causal, shape, kind)
    q = _randn((b, hq, nq, d), dtype, gen, layout).cuda()
    k, v = (_randn((b, hkv, nk, d), dtype, gen, layout).cuda() for _ in range(2))
    bias = _make_bias(kind, b, hq, nq, nk, dtype, gen).cuda()
    inp = validate(q, k, v, bias, causal=causal)
    assert not sm80.not_supported_reasons(inp), sm80.not_supported_reasons(inp)
    _check_against_ref(sm80, poisoned, q, k, v, bias, causal, gen)


def test_lse_gradient(sm80, poisoned):
    """dlse (ring attention, attention sinks) is folded in: float32 q is not in this kernel, so
    bf16 against the float64 dense path with the dtype's floor."""
    gen = _seeded("dlse")
    q, k, v = (_randn(s, torch.bfloat16, gen).cuda() for s in ((1, 2, 100, 64), (1, 1, 120, 64), (1, 1, 120, 64)))
    bias = torch.randn(1, 2, 100, 120, generator=gen).to(torch.bfloat16).cuda()
    inp = validate(q, k, v, bias)
    out, lse = poisoned(sm80.forward, inp, None)
    dout = _randn(out.shape, torch.bfloat16, gen).cuda()
    dlse = torch.randn(lse.shape, generator=gen).cuda()
    grads = poisoned(sm80.backward, inp, None, out, lse, dout, dlse, True)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    o64, l64 = _dense64(*leaves, False, inp.scale)
    torch.autograd.backward((o64, l64), (dout.double(), dlse.double()))
    for name, got, ref in zip(("dq", "dk", "dv", "dbias"), grads, (t.grad for t in leaves)):
        assert torch.isfinite(got).all(), name
        assert _rel(got, ref) < 2e-2, name


def _keep_mask(sm80, q, k, seed, p, causal=False):
    """The kernel's keep-mask, read off a run with v = identity: its zeros are the dropped entries."""
    nk = k.shape[2]
    eye = torch.eye(nk, dtype=q.dtype, device=q.device).expand(k.shape[0], k.shape[1], nk, nk)
    out, _ = sm80.forward(validate(q, k, eye, causal=causal, dropout_p=p), seed)
    return out != 0


@pytest.mark.parametrize("d,causal", [(64, False), (128, "top_left"), (256, False)])
def test_dropout_backward_regenerates_the_forward_mask(sm80, poisoned, d, causal):
    p, b, h, nq, nk = 0.2, 2, 3, 100, 128
    gen = _seeded("dropout", d, causal)
    q = _randn((b, h, nq, d), torch.bfloat16, gen).cuda()
    k = _randn((b, h, nk, d), torch.bfloat16, gen).cuda()
    v = _randn((b, h, nk, d), torch.bfloat16, gen).cuda()
    seed = torch.tensor([1234, 5678], device="cuda")
    keep = _keep_mask(sm80, q, k, seed, p, causal)
    inp = validate(q, k, v, causal=causal, dropout_p=p)
    out, lse = poisoned(sm80.forward, inp, seed)
    dout = _randn(out.shape, torch.bfloat16, gen).cuda()
    grads = poisoned(sm80.backward, inp, seed, out, lse, dout, None, False)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = _dense64(*leaves, None, causal, inp.scale, drop_keep=keep, p=p)
    out64.backward(dout.double())
    torch.testing.assert_close(lse.double(), lse64.detach(), rtol=0, atol=2e-3)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads[:3]), (out64.detach(), *(t.grad for t in leaves))):
        assert torch.isfinite(got).all(), name
        assert _rel(got, ref) < 2e-2, f"{name}: {_rel(got, ref):.3g}"


def test_dropout_statistics_and_seeding(sm80):
    p = 0.3
    gen = _seeded("stats")
    q = _randn((1, 2, 128, 64), torch.bfloat16, gen).cuda()
    k = _randn((1, 2, 128, 64), torch.bfloat16, gen).cuda()
    seed = torch.tensor([42, 0], device="cuda")
    keep = _keep_mask(sm80, q, k, seed, p)
    # 32768 draws: the dropped fraction's standard deviation is ~0.0025; 6 sigma.
    assert abs((~keep).float().mean().item() - p) < 0.015
    assert not torch.equal(keep[:, 0], keep[:, 1])
    assert torch.equal(keep, _keep_mask(sm80, q, k, seed, p))
    # Read on the device: a new value in the same seed tensor (what a CUDA graph replay sees)
    # draws a new mask, and both words count.
    seed.copy_(torch.tensor([43, 0]))
    assert not torch.equal(keep, _keep_mask(sm80, q, k, seed, p))
    seed.copy_(torch.tensor([42, 1]))
    assert not torch.equal(keep, _keep_mask(sm80, q, k, seed, p))


@pytest.mark.parametrize("causal", [0, 1, 2], ids=["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("d", [64, 128])
def test_varlen_against_the_per_sequence_reference(sm80, poisoned, causal, d):
    gen = _seeded("varlen", causal, d)
    lens_q = [37, 0, 130, 64, 1]
    lens_k = [50, 9, 130, 80, 3] if causal == 2 else [37, 5, 130, 64, 1]
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q), 4, d, generator=gen).to(torch.bfloat16).cuda()
    k, v = (torch.randn(sum(lens_k), 2, d, generator=gen).to(torch.bfloat16).cuda() for _ in range(2))
    scale = d ** -0.5
    out, lse = poisoned(sm80.forward_varlen, q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal, scale, 0.0, None)
    ref_out, ref_lse = varlen._reference_forward(*(t.double() for t in (q, k, v)), cu_q, cu_k, causal, scale, 0.0,
                                                 0.0, None)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=0, atol=2e-3)
    assert _rel(out, ref_out) < 2e-2
    dout = torch.randn(out.shape, generator=gen).to(torch.bfloat16).cuda()
    dlse = torch.randn(lse.shape, generator=gen).cuda()
    grads = poisoned(sm80.backward_varlen, dout, dlse, q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), None, out, lse,
                     causal, scale, 0.0)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64, l64 = varlen.varlen_fwd(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), None, causal, scale, 0.0)[:2]
    torch.autograd.backward((o64, l64), (dout.double(), dlse.double()))
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        assert got.shape == leaf.shape and torch.isfinite(got).all(), name
        assert _rel(got, leaf.grad) < 2e-2, f"{name}: {_rel(got, leaf.grad):.3g}"


def test_forced_through_the_op_with_autograd_and_compile(sm80, monkeypatch):
    """FLASH_INDUCTOR_KERNEL=cutlass_sm80 through `attention` (eager and compiled, training),
    and dispatch names it."""
    monkeypatch.setenv(dispatch.ENV_VAR, "cutlass_sm80")
    dispatch.clear_choices()
    gen = _seeded("op")
    q, k, v = (_randn((2, 4, 96, 64), torch.bfloat16, gen).cuda().requires_grad_() for _ in range(3))
    bias = torch.randn(1, 4, 96, 96, generator=gen).to(torch.bfloat16).cuda().requires_grad_()
    assert dispatch.select(validate(q, k, v, bias, causal=True)).NAME == "cutlass_sm80"

    def step(q, k, v, bias):
        return flash_inductor.attention(q, k, v, bias, causal=True).float().square().sum()

    eager = torch.autograd.grad(step(q, k, v, bias), (q, k, v, bias))
    compiled = torch.autograd.grad(torch.compile(step, backend="flash", fullgraph=True)(q, k, v, bias), (q, k, v, bias))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    o64, _ = _dense64(*leaves, "top_left", 64 ** -0.5)
    torch.autograd.backward(o64.square().sum(), inputs=leaves)
    for got_e, got_c, leaf in zip(eager, compiled, leaves):
        assert _rel(got_e, leaf.grad) < 2e-2 and _rel(got_c, leaf.grad) < 2e-2


def test_deterministic_backward_repeats_bit_for_bit(sm80, poisoned):
    """Under torch.use_deterministic_algorithms(True) the backward runs one split per (batch,
    head): dQ is added in key order, so two runs agree to the bit, and they match float64."""
    gen = _seeded("deterministic")
    q, k, v = (_randn((1, 2, 300, 64), torch.bfloat16, gen).cuda() for _ in range(3))
    bias = torch.randn(1, 2, 300, 300, generator=gen).to(torch.bfloat16).cuda()
    inp = validate(q, k, v, bias)
    out, lse = sm80.forward(inp, None)
    dout = _randn(out.shape, torch.bfloat16, gen).cuda()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not sm80.not_supported_reasons(inp), sm80.not_supported_reasons(inp)
        first = poisoned(sm80.backward, inp, None, out, lse, dout, None, True)
        second = poisoned(sm80.backward, inp, None, out, lse, dout, None, True)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    o64, _ = _dense64(*leaves, False, inp.scale)
    o64.backward(dout.double())
    for name, got, leaf in zip(("dq", "dk", "dv", "dbias"), first, leaves):
        assert _rel(got, leaf.grad) < 2e-2, name
