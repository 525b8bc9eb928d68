"""The Triton kernels against `attention_ref` in float64: on CPU under TRITON_INTERPRET=1, and
at real sizes on CUDA (marked `gpu`).

Interpreter isolation: TRITON_INTERPRET must be set before triton is imported (triton 3.9's
own jit'd helpers, such as the combine functions behind tl.sum/tl.max, are built at import),
and once set it would also make `TritonBackend` accept CPU tensors for every other test module
in the process, and break compiled kernels on a GPU machine. So the interpreter tests
(`@interpreted`) run in one child pytest process started with TRITON_INTERPRET=1 and no
visible GPU; in this process each of them reports the child's outcome for the same test id.
Running this file with TRITON_INTERPRET=1 already set runs them directly, in-process.

Accuracy bound, as FlashAttention's tests: an error at most 2x the one PyTorch's own
`attention_ref` makes in the same dtype against the float64 result, plus a small floor.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib

import pytest
import torch

from flash_inductor import attention_ref
from flash_inductor.inputs import MASKED_BIAS, Causal, validate

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

KERNEL_MODULE = "flash_inductor.kernels.triton_attention"
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
POISON = float("nan")


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def interp():
    """The kernel module; its kernels are interpreted in the child process."""
    return importlib.import_module(KERNEL_MODULE)


@pytest.fixture(scope="module")
def interpreter_outcomes(request, tmp_path_factory):
    """Run every selected `@interpreted` test once in a TRITON_INTERPRET=1 child pytest:
    {test name: None if passed, else ("failed" | "skipped", message)}."""
    ids = [i.nodeid for i in request.session.items if getattr(i.function, "interpreted", False)]
    xml = tmp_path_factory.mktemp("interpreter") / "junit.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *ids],
        cwd=request.config.rootpath, env=env, capture_output=True, text=True,
    )
    if not xml.exists():
        pytest.fail(f"the interpreter subprocess wrote no results:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = next((e for e in (case.find("failure"), case.find("error")) if e is not None), None)
        skip = case.find("skipped")
        if bad is not None:
            outcomes[case.get("name")] = ("failed", (bad.text or bad.get("message") or "")[-6000:])
        elif skip is not None:
            outcomes[case.get("name")] = ("skipped", skip.get("message", ""))
        else:
            outcomes[case.get("name")] = None
    return outcomes


def interpreted(test):
    """Run `test` under the Triton interpreter: directly in the child, by proxy here."""
    test.interpreted = True
    if INTERPRETING:
        return test

    @functools.wraps(test)
    def proxy(request, interpreter_outcomes, **kwargs):
        name = request.node.name
        if name not in interpreter_outcomes:
            pytest.fail(f"{name} did not run in the interpreter subprocess")
        outcome = interpreter_outcomes[name]
        if outcome is not None and outcome[0] == "skipped":
            pytest.skip(outcome[1])
        if outcome is not None:
            pytest.fail(f"under TRITON_INTERPRET=1:\n{outcome[1]}", pytrace=False)

    params = [p for n, p in inspect.signature(test).parameters.items() if n not in ("interp", "poisoned")]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in ("request", "interpreter_outcomes")]
    proxy.__signature__ = inspect.Signature(
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params] + extra
    )
    proxy.interpreted = True
    return proxy


@pytest.fixture
def poisoned(monkeypatch):
    """Every float torch.empty made during a kernel call is NaN-filled, so an element the
    kernel forgets to write shows up as non-finite instead of passing by luck."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(POISON)
        return t

    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", empty)
            return fn(*args)

    return run


# ---- inputs and float64 ground truth ------------------------------------------------------


def _randn(shape, dtype, gen, layout="bhnd"):
    """Fresh normal values; layout 'bnhd' returns a strided [B, H, N, D] view of a [B, N, H, D]
    tensor, as a model that transposes its projections passes them."""
    if layout == "bnhd":
        b, h, n, d = shape
        return torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)
    return torch.randn(shape, generator=gen).to(dtype)


def _bias(kind, B, Hq, Nq, Nk, dtype, gen):
    if kind is None:
        return None
    if kind == "bool":
        keep = torch.rand(B, 1, Nq, Nk, generator=gen) > 0.3
        keep[:, :, 3] = False  # a fully masked row: zeros and lse = -inf
        return keep
    if kind == "keys_strided":
        # T5's position bias: an [Nq, Nk, H] embedding permuted to [1, H, Nq, Nk] (key stride H).
        return torch.randn(Nq, Nk, Hq, generator=gen).to(dtype).permute(2, 0, 1).unsqueeze(0)
    shape = {
        "heads_rows_keys": (1, Hq, Nq, Nk),
        "full": (B, Hq, Nq, Nk),
        "batch_keys": (B, 1, 1, Nk),
        "rows_keys": (Nq, Nk),
        "heads_keys": (1, Hq, 1, Nk),
    }[kind]
    return torch.randn(shape, generator=gen).to(dtype)


def _masked_scores64(q, k, bias, causal, scale, softcap=None):
    """float64 [B, Hq, Nq, Nk] scores with -inf where hidden (for lse and dense references)."""
    g = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    nq, nk = q.shape[2], k.shape[2]
    dev = q.device
    keep = torch.ones(nq, nk, dtype=torch.bool, device=dev)
    if bias is not None and bias.dtype == torch.bool:
        keep = keep & bias
    elif bias is not None:
        s = s + bias.double()
        keep = keep & (bias > MASKED_BIAS)
    c = Causal.parse(causal)
    if c != Causal.NONE:
        shift = nk - nq if c == Causal.BOTTOM_RIGHT else 0
        keep = keep & (torch.arange(nk, device=dev)[None, :] <= torch.arange(nq, device=dev)[:, None] + shift)
    return s.masked_fill(~keep, float("-inf"))


def _dense64(q, k, v, bias, causal, scale, drop_keep=None, p=0.0):
    """float64 (out, lse) with autograd; `drop_keep` applies a given dropout keep-mask."""
    s = _masked_scores64(q, k, bias, causal, scale)
    lse = torch.logsumexp(s, -1)
    prob = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    if drop_keep is not None:
        prob = prob * drop_keep / (1.0 - p)
    g = q.shape[1] // k.shape[1]
    return prob @ v.double().repeat_interleave(g, 1), lse


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _ref_out_and_grads(q, k, v, bias, causal, dout, dtype, softcap=None, scale=None):
    """(out, dq, dk, dv, dbias) from autograd of attention_ref, with its inputs in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    b = None
    if bias is not None:
        b = bias if bias.dtype == torch.bool else bias.detach().to(dtype).requires_grad_()
    out = attention_ref(*leaves, b, causal=causal, softcap=softcap, scale=scale)
    out.backward(dout.to(dtype))
    dbias = b.grad if b is not None and b.dtype != torch.bool else None
    return (out.detach(), *(t.grad for t in leaves), dbias)


def _check_against_ref(kernels, run, q, k, v, bias, causal, gen, dlse=False, softcap=None, scale=None, dout=None,
                       lse_rtol=0.0):
    """Forward and backward of `kernels` against float64 autograd; bounds from `q.dtype`.
    `lse_rtol`: for rows whose scores sit near -1e30, where float32 holds lse only relatively."""
    dtype = q.dtype
    inp = validate(q, k, v, bias, causal=causal, softcap=softcap, scale=scale)
    out, lse = run(kernels.forward, inp, None)
    assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert torch.isfinite(out).all()

    lse64 = torch.logsumexp(_masked_scores64(q, k, bias, causal, inp.scale, softcap), -1)
    assert not lse.isnan().any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64))
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse.double()[finite], lse64[finite], rtol=lse_rtol, atol=1e-5 if dtype == torch.float32 else 2e-3)

    if dout is None:
        dout = _randn(out.shape, dtype, gen).to(q.device)
    bias_grad = bias is not None and bias.dtype != torch.bool
    dlse_t = torch.randn(lse.shape, generator=gen).to(q.device) if dlse else None
    grads = run(kernels.backward, inp, None, out, lse, dout, dlse_t, bias_grad)

    ref64 = _ref_out_and_grads(q, k, v, bias, causal, dout, torch.float64, softcap, inp.scale)
    ref_lo = _ref_out_and_grads(q, k, v, bias, causal, dout, dtype, softcap, inp.scale)
    if dlse:
        assert not softcap, "the dlse path's dense reference has no soft-capping"
        # attention_ref has no lse: fold d lse in through the dense float64 path instead.
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        b = bias.detach().double().requires_grad_() if bias_grad else bias
        o64, l64 = _dense64(*leaves, b, causal, inp.scale)
        torch.autograd.backward((o64, l64), (dout.double(), dlse_t.double()))
        ref64 = (o64.detach(), *(t.grad for t in leaves), b.grad if bias_grad else None)
        ref_lo = ref64  # the bound then is the floor alone (dtype is float32 in these cases)

    names = ("out", "dq", "dk", "dv", "dbias")
    for name, got, r64, rlo in zip(names, (out, *grads), ref64, ref_lo):
        if r64 is None:
            assert got is None, name
            continue
        ref_shape = bias.shape if name == "dbias" else r64.shape
        assert got.shape == ref_shape and got.dtype == (bias.dtype if name == "dbias" else dtype), name
        assert torch.isfinite(got).all(), name
        bound = 2 * _rel(rlo, r64) + FLOOR[dtype]
        err = _rel(got, r64)
        assert err <= bound, f"{name}: relative error {err:.3g} > bound {bound:.3g}"


# ---- the interpreter grid ------------------------------------------------------------------

# (B, Hq, Hkv, Nq, Nk, D, Dv, dtype, causal, bias kind, q/k/v layout)
CASES = {
    "plain": (2, 2, 2, 37, 45, 16, 16, torch.float32, False, None, "bhnd"),
    "gqa_top_left_nq_gt_nk_strided": (1, 4, 2, 45, 37, 24, 40, torch.float32, "top_left", None, "bnhd"),
    "mqa_bottom_right_nq_gt_nk": (1, 4, 1, 45, 37, 40, 24, torch.float32, "bottom_right", None, "bhnd"),
    "fp16_bottom_right": (2, 2, 1, 37, 45, 24, 24, torch.float16, "bottom_right", None, "bnhd"),
    "bias_heads_rows_keys_causal": (2, 4, 2, 37, 45, 16, 24, torch.float32, "top_left", "heads_rows_keys", "bhnd"),
    "bias_batch_keys": (2, 2, 1, 37, 45, 40, 16, torch.float32, False, "batch_keys", "bhnd"),
    # Unbroadcast bias: dS is written straight into dbias, causal-skipped blocks as zeros.
    "bias_full_top_left_fp16": (2, 2, 1, 45, 37, 16, 16, torch.float16, "top_left", "full", "bhnd"),
    "bias_rows_keys_fp16": (1, 2, 2, 45, 37, 24, 24, torch.float16, "bottom_right", "rows_keys", "bhnd"),
    "bias_heads_keys": (2, 2, 2, 20, 33, 16, 16, torch.float32, False, "heads_keys", "bhnd"),
    "bias_keys_strided_t5": (2, 4, 4, 37, 45, 16, 16, torch.float32, "top_left", "keys_strided", "bhnd"),
    "bool_mask_empty_row": (2, 2, 1, 37, 45, 16, 16, torch.float32, False, "bool", "bhnd"),
    "bool_mask_bottom_right": (1, 4, 2, 45, 37, 24, 16, torch.float32, "bottom_right", "bool", "bnhd"),
    "head_dim_1": (1, 1, 1, 5, 3, 1, 3, torch.float32, False, None, "bhnd"),
}


@pytest.mark.parametrize("case", list(CASES))
@interpreted
def test_forward_backward(interp, poisoned, case):
    _check_case(interp, poisoned, case)


def _check_case(interp, poisoned, case):
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype, causal, bias_kind, layout = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q = _randn((B, Hq, Nq, D), dtype, gen, layout)
    k = _randn((B, Hkv, Nk, D), dtype, gen, layout)
    v = _randn((B, Hkv, Nk, Dv), dtype, gen, layout)
    bias = _bias(bias_kind, B, Hq, Nq, Nk, dtype, gen)
    _check_against_ref(interp, poisoned, q, k, v, bias, causal, gen)


# Small shapes take the joint dK/dV + dQ grid (`_attn_bwd_joint`); these run the two kernels
# that every larger non-causal input runs.
@pytest.mark.parametrize("case", ["plain", "gqa_top_left_nq_gt_nk_strided", "bias_heads_rows_keys_causal", "bool_mask_bottom_right"])
@interpreted
def test_forward_backward_separate_kernels(interp, poisoned, monkeypatch, case):
    monkeypatch.setenv("FLASH_INDUCTOR_BWD_JOINT", "0")
    _check_case(interp, poisoned, case)


def test_joint_backward_grid_only_where_a_kernel_would_leave_sms_idle(monkeypatch):
    """Causal backwards run in one grid at every length; non-causal ones only while the dK/dV
    grid is under two waves (session 15, H100: +10% at N=2048, -2% at 4096, B=1 H=12, D=128)."""
    from flash_inductor.kernels import triton_attention as ta

    monkeypatch.setenv(ta.AUTOTUNE_ENV, "0")
    monkeypatch.delenv("FLASH_INDUCTOR_BWD_JOINT", raising=False)
    h100 = torch.device("cpu")  # counted as 132 SMs

    def joint(n, causal, heads=12, bias=False):
        meta = dict(D=128, DV=128, BLOCK_D=128, BLOCK_DV=128, ELT_BYTES=2, CAUSAL=causal, HAS_BIAS=bias,
                    BIAS_IS_BOOL=False, HAS_DROPOUT=False)
        sc = dict(N_BUCKET=n)
        return ta._joint_configs(meta, sc, n, heads, h100)

    assert joint(2048, 0) == ((64, 128, 128, 64), 8, 3)
    assert joint(4096, 0) is None and joint(2048, 0, heads=96) is None
    assert joint(4096, 1) == joint(8192, 1) == joint(8192, 2) == ((64, 128, 128, 64), 8, 3)
    # A bias up to 4096 streams dK/dV in a 4-warp tile: no shared config, two kernels.
    assert joint(2048, 1, bias=True) is None
    monkeypatch.setenv("FLASH_INDUCTOR_BWD_JOINT", "0")
    assert joint(8192, 1) is None


def _odd_float32_inputs(seed):
    """(generator, q, k, v, bias): 37 queries, 45 keys (neither a block multiple), 2 heads,
    D=16, float32, a normal bias for the tests to mask parts of."""
    gen = torch.Generator().manual_seed(seed)
    q = _randn((1, 2, 37, 16), torch.float32, gen)
    k = _randn((1, 2, 45, 16), torch.float32, gen)
    v = _randn((1, 2, 45, 16), torch.float32, gen)
    return gen, q, k, v, torch.randn(1, 2, 37, 45, generator=gen)


# The forward adds a float bias without masking entries <= MASKED_BIAS one by one; rows whose
# max stays at or below REDO_BELOW are computed again with the select. Rows masked whole by a
# finite -1e30 must come out empty (zeros, lse = -inf), as the contract says, not averaged.
@pytest.mark.parametrize("causal", [False, "bottom_right"])
@interpreted
def test_finite_masked_rows_take_the_exact_pass(interp, poisoned, causal):
    gen, q, k, v, bias = _odd_float32_inputs(7)
    bias[0, 0, 3] = -1e30  # whole rows masked by a finite value: the second pass
    bias[0, 1, 20] = -2e30
    bias[0, 0, 5, 10:] = -1e30  # partly masked rows: the fast pass, exactly
    bias[0, 1, 30, 30:] = -1e30
    bias[0, 1, 9] = torch.finfo(torch.float32).min  # overflows to -inf in base 2: no second pass
    _check_against_ref(interp, poisoned, q, k, v, bias, causal, gen)
    _, lse = poisoned(interp.forward, validate(q, k, v, bias, causal=causal), None)
    assert torch.isneginf(lse[0, 0, 3]) and torch.isneginf(lse[0, 1, 20]) and torch.isneginf(lse[0, 1, 9])
    assert torch.isfinite(lse[0, 0, 5]) and torch.isfinite(lse[0, 1, 30])


# The backward adds a float bias without the select that masks entries <= MASKED_BIAS. That is
# exact on every row whose lse is above REDO_BELOW; a row at or below it (every visible key's
# score near -1e30, as in the forward's second pass) passes no gradient: float32 cannot hold its
# lse to within log2(Nk), so exp2(s - lse) is noise there, and here a masked key scoring above the
# visible ones would make it inf (NaN gradients for the whole head). Those rows get dO = 0 in the
# comparison (so their exact gradient is 0 too); then with dO != 0 they must still give none.
@pytest.mark.parametrize("causal", [False, "bottom_right"])
@interpreted
def test_rows_near_the_mask_value_pass_no_gradient(interp, poisoned, causal):
    gen, q, k, v, bias = _odd_float32_inputs(5)
    dout = _randn((1, 2, 37, 16), torch.float32, gen)
    rows = ((0, 3, 5), (1, 20, 25))  # (head, row, masked key), the key visible under either alignment
    for h, row, key in rows:
        bias[0, h, row] = -9e29
        bias[0, h, row, key] = -1e30
        q[0, h, row] = 1e30 * k[0, h, key] / k[0, h, key].square().sum()  # q·k = 1e30 on that key
        dout[0, h, row] = 0.0
    _check_against_ref(interp, poisoned, q, k, v, bias, causal, gen, dout=dout, lse_rtol=3e-7)

    inp = validate(q, k, v, bias, causal=causal)
    out, lse = poisoned(interp.forward, inp, None)
    dq, dk, dv, dbias = poisoned(interp.backward, inp, None, out, lse, torch.randn_like(out), None, True)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv, dbias))
    for h, row, _ in rows:
        assert lse[0, h, row] < -5e29
        assert not dq[0, h, row].any() and not dbias[0, h, row].any()


# A positive scale is folded into exp2's argument (SCORES_FOLDED); zero and negative scales take
# the multiply-first path, where a hidden key must stay -inf (0 · -inf and -s · -inf would not).
@pytest.mark.parametrize("scale", [0.3, 0.0, -0.3])
@pytest.mark.parametrize("causal", [False, "top_left"])
@interpreted
def test_any_scale_sign(interp, poisoned, scale, causal):
    gen = torch.Generator().manual_seed(11)
    q = _randn((1, 2, 37, 16), torch.float32, gen)
    k = _randn((1, 2, 45, 16), torch.float32, gen)
    v = _randn((1, 2, 45, 16), torch.float32, gen)
    _check_against_ref(interp, poisoned, q, k, v, None, causal, gen, scale=scale)


def test_scores_mode_folds_only_a_positive_scale_without_a_cap(interp):
    q = torch.randn(1, 1, 4, 8)
    modes = {
        (scale, cap): interp._scores_mode(validate(q, q, q, scale=scale, softcap=cap))
        for scale in (0.5, 0.0, -0.5) for cap in (None, 2.0)
    }
    assert modes == {
        (0.5, None): interp.SCORES_FOLDED.value, (0.0, None): interp.SCORES_SCALED.value,
        (-0.5, None): interp.SCORES_SCALED.value, (0.5, 2.0): interp.SCORES_CAPPED.value,
        (0.0, 2.0): interp.SCORES_CAPPED.value, (-0.5, 2.0): interp.SCORES_CAPPED.value,
    }


# Logit soft-capping (Gemma 2): (B, Hq, Hkv, Nq, Nk, D, dtype, causal, bias kind, cap). Scores are
# drawn at scale 1 with a cap small enough that most of them sit on tanh's curved part, plus a
# case whose scores are near 0 (the series branch of `_tanh`).
SOFTCAP_CASES = {
    "gqa_causal_mask": (2, 4, 2, 37, 45, 16, torch.float32, "top_left", "batch_keys", 2.0),
    "bias_grad_bottom_right": (1, 2, 2, 45, 37, 24, torch.float32, "bottom_right", "heads_rows_keys", 3.0),
    "bool_mask_fp16": (2, 2, 1, 37, 45, 16, torch.float16, False, "bool", 2.5),
    "scores_near_zero": (1, 2, 2, 20, 33, 16, torch.float32, False, None, 50.0),
}


@pytest.mark.parametrize("case", list(SOFTCAP_CASES))
@interpreted
def test_softcap_forward_backward(interp, poisoned, case):
    B, Hq, Hkv, Nq, Nk, D, dtype, causal, bias_kind, cap = SOFTCAP_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q = _randn((B, Hq, Nq, D), dtype, gen)
    k = _randn((B, Hkv, Nk, D), dtype, gen)
    v = _randn((B, Hkv, Nk, D), dtype, gen)
    if case == "scores_near_zero":
        q = q * 0.05
    bias = _bias(bias_kind, B, Hq, Nq, Nk, dtype, gen)
    _check_against_ref(interp, poisoned, q, k, v, bias, causal, gen, softcap=cap)


# The fused backward (dQ by atomics from the dK/dV kernel) forced on without dropout: every
# path of the dK/dV loop adds into dQ (causal band and full blocks, keys past Nk, rows with no
# visible key, GQA groups, soft-capping's extra factor, an incoming dlse).
FUSED_DQ_CASES = ["gqa_top_left_nq_gt_nk_strided", "mqa_bottom_right_nq_gt_nk", "fp16_bottom_right",
                  "bool_mask_empty_row"]


@pytest.mark.parametrize("case", FUSED_DQ_CASES + ["softcap", "dlse"])
@interpreted
def test_fused_dq_backward(interp, poisoned, monkeypatch, case):
    monkeypatch.setenv(interp.FUSED_DQ_ENV, "1")
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    if case == "softcap":
        q, k, v = (_randn(s, torch.float32, gen) for s in ((2, 4, 37, 16), (2, 2, 45, 16), (2, 2, 45, 16)))
        _check_against_ref(interp, poisoned, q, k, v, _bias("bool", 2, 4, 37, 45, None, gen), "top_left", gen,
                           softcap=2.0)
        return
    if case == "dlse":
        q, k, v = (_randn(s, torch.float32, gen) for s in ((1, 2, 37, 16), (1, 1, 45, 16), (1, 1, 45, 24)))
        _check_against_ref(interp, poisoned, q, k, v, None, "bottom_right", gen, dlse=True)
        return
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype, causal, bias_kind, layout = CASES[case]
    q = _randn((B, Hq, Nq, D), dtype, gen, layout)
    k = _randn((B, Hkv, Nk, D), dtype, gen, layout)
    v = _randn((B, Hkv, Nk, Dv), dtype, gen, layout)
    _check_against_ref(interp, poisoned, q, k, v, _bias(bias_kind, B, Hq, Nq, Nk, dtype, gen), causal, gen)


def test_fused_dq_is_dropouts_default_and_never_deterministic(monkeypatch):
    ta = importlib.import_module(KERNEL_MODULE)
    monkeypatch.delenv(ta.FUSED_DQ_ENV, raising=False)
    q = torch.zeros(1, 2, 8, 16)
    plain, dropout = validate(q, q, q), validate(q, q, q, dropout_p=0.1)
    assert ta.fused_dq(dropout, False) and not ta.fused_dq(plain, False)
    # A bias that requires grad needs the dQ kernel's dS.
    assert not ta.fused_dq(dropout, True)
    monkeypatch.setenv(ta.FUSED_DQ_ENV, "1")
    assert ta.fused_dq(plain, False) and not ta.fused_dq(plain, True)
    monkeypatch.setenv(ta.FUSED_DQ_ENV, "0")
    assert not ta.fused_dq(dropout, False)
    monkeypatch.setenv(ta.FUSED_DQ_ENV, "1")
    prior = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not ta.fused_dq(dropout, False)
    finally:
        torch.use_deterministic_algorithms(prior)


_kernel_tanh = None


@triton.jit
def _tanh_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _kernel_tanh(tl.load(X + offs)))


@interpreted
def test_large_head_default_tiles(interp, poisoned, monkeypatch):
    """The tiles head dims above 128 run with autotuning off (dK/dV 32 queries × 64 keys; forward
    128 × 64; dQ 64 × 32), at head dim 192 with soft-capping, a bias gradient and bottom-right
    causal. The interpreter ignores warps: this pins the tile logic, the GPU tests the compiled
    kernels."""
    wide = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    fwd = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    tall = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    for kernel, cfg in ((interp._attn_bwd_dkdv, wide), (interp._attn_fwd, fwd), (interp._attn_bwd_dq, tall)):
        monkeypatch.setattr(kernel, "configs", [cfg])
        monkeypatch.setattr(kernel, "cache", {})
    gen = torch.Generator().manual_seed(192)
    q, k, v = (_randn(s, torch.float32, gen) for s in ((1, 2, 75, 192), (1, 2, 101, 192), (1, 2, 101, 192)))
    bias = _bias("heads_rows_keys", 1, 2, 75, 101, torch.float32, gen)
    _check_against_ref(interp, poisoned, q, k, v, bias, "bottom_right", gen, softcap=20.0)


@interpreted
def test_softcap_tanh_is_accurate_across_its_branches(interp):
    """`_tanh` against torch's float64 tanh, on both sides of the series/exp2 switch and out to
    saturation: relative error below 2e-6 everywhere."""
    global _kernel_tanh
    _kernel_tanh = interp._tanh  # Triton resolves a kernel's globals when it runs, not closures
    x = torch.cat([torch.linspace(-0.2, 0.2, 512), torch.linspace(-30.0, 30.0, 512)]).float()
    y = torch.empty_like(x)
    _tanh_kernel[(1,)](x, y, N=x.numel())
    ref = torch.tanh(x.double())
    rel = ((y.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
    assert rel < 2e-6, rel


@pytest.mark.parametrize("causal", [False, "bottom_right"])
@interpreted
def test_dlse_is_folded_into_delta(interp, poisoned, causal):
    gen = torch.Generator().manual_seed(7)
    q, k, v = (_randn(s, torch.float32, gen) for s in ((1, 2, 37, 16), (1, 1, 45, 16), (1, 1, 45, 24)))
    bias = torch.randn(1, 2, 37, 45, generator=gen)
    _check_against_ref(interp, poisoned, q, k, v, bias, causal, gen, dlse=True)


def _dropout_mask(kernels, q, k, seed, p, causal=False, bias=None):
    """The kernel's keep-mask [B, Hq, Nq, Nk], read off a run with v = identity (Nk <= Dv):
    out[i, :Nk] = P[i] * keep[i] / (1-p), so its zeros are the dropped entries."""
    nk = k.shape[2]
    eye = torch.eye(nk, nk, dtype=q.dtype, device=q.device).expand(k.shape[0], k.shape[1], nk, nk)
    out, _ = kernels.forward(validate(q, k, eye, bias, causal=causal, dropout_p=p), seed)
    return out != 0


@pytest.mark.parametrize("fused", ["1", "0"], ids=["fused_dq", "dq_kernel"])
@pytest.mark.parametrize(
    "causal,bias_kind", [(False, None), ("bottom_right", "heads_rows_keys")], ids=["plain", "causal_bias"]
)
@interpreted
def test_dropout_backward_matches_forward_mask(interp, poisoned, monkeypatch, causal, bias_kind, fused):
    """Both backwards regenerate the forward's keep bits: the fused one (dQ added by the dK/dV
    kernel, dropout's default) and the two-kernel one. With a bias that requires grad the dQ
    kernel runs either way (it writes dS)."""
    monkeypatch.setenv(interp.FUSED_DQ_ENV, fused)
    B, Hq, Hkv, Nq, Nk, D, p = 2, 4, 2, 37, 24, 16, 0.25
    gen = torch.Generator().manual_seed(11)
    q, k, v = (_randn(s, torch.float32, gen) for s in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Nk)))
    bias = _bias(bias_kind, B, Hq, Nq, Nk, torch.float32, gen)
    seed = torch.tensor([1234, 5678])
    keep = _dropout_mask(interp, q, k, seed, p, causal, bias)

    inp = validate(q, k, v, bias, causal=causal, dropout_p=p)
    out, lse = poisoned(interp.forward, inp, seed)
    dout = _randn(out.shape, torch.float32, gen)
    grads = poisoned(interp.backward, inp, seed, out, lse, dout, None, bias is not None)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    b = bias.detach().double().requires_grad_() if bias is not None else None
    out64, lse64 = _dense64(*leaves, b, causal, inp.scale, drop_keep=keep, p=p)
    out64.backward(dout.double())
    # The normaliser ignores dropout: lse is the undropped one.
    torch.testing.assert_close(lse.double(), lse64.detach(), rtol=0, atol=1e-5)
    refs = (out64.detach(), *(t.grad for t in leaves), b.grad if b is not None else None)
    for name, got, ref in zip(("out", "dq", "dk", "dv", "dbias"), (out, *grads), refs):
        if ref is None:
            continue
        assert torch.isfinite(got).all(), name
        assert _rel(got, ref) < 1e-5, name


@interpreted
def test_dropout_statistics_and_seeding(interp):
    p = 0.3
    gen = torch.Generator().manual_seed(3)
    q, k = _randn((1, 2, 64, 16), torch.float32, gen), _randn((1, 1, 64, 16), torch.float32, gen)
    keep = _dropout_mask(interp, q, k, torch.tensor([42, 0]), p)
    # 8192 draws: the dropped fraction's standard deviation is ~0.005; 5 sigma.
    assert abs((~keep).float().mean().item() - p) < 0.025
    # The mask differs between query heads (the group shares one KV head) ...
    assert not torch.equal(keep[:, 0], keep[:, 1])
    # ... is a pure function of the seed tensor, and both of its words matter.
    assert torch.equal(keep, _dropout_mask(interp, q, k, torch.tensor([42, 0]), p))
    assert not torch.equal(keep, _dropout_mask(interp, q, k, torch.tensor([43, 0]), p))
    assert not torch.equal(keep, _dropout_mask(interp, q, k, torch.tensor([42, 1]), p))


_DRAW_MASK_CC = r"""
#include <cstdio>
#include <cstdlib>
#include "dropout_philox.h"
// argv: seed offset batch heads rows keys threshold; prints the keep mask, one '0'/'1' per score
int main(int argc, char** argv) {
  long long seed = std::strtoll(argv[1], nullptr, 0), offset = std::strtoll(argv[2], nullptr, 0);
  int b = std::atoi(argv[3]), h = std::atoi(argv[4]), n = std::atoi(argv[5]), m = std::atoi(argv[6]);
  unsigned t = unsigned(std::atoi(argv[7]));
  for (int bh = 0; bh < b * h; ++bh)
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < m; ++j)
        std::putchar(flash_dropout::keep(uint64_t(seed), flash_dropout::fold_offset(offset), bh, i, j, t) ? '1' : '0');
  return 0;
}
"""


@interpreted
def test_preprocess_writes_the_cutlass_backwards_lse(interp):
    """The preprocess's second output, which the CUTLASS backward subtracts in every tile:
    lse · log2(e) per row, +inf where lse is -inf (a row the bias hides: its exponents must come
    out -inf, not NaN), beside delta as before; rows past a block's end are left alone."""
    gen = torch.Generator().manual_seed(zlib.crc32(b"preprocess lse"))
    b, h, n, d = 2, 3, 40, 16
    out, dout = (torch.randn(b, h, n, d, generator=gen) for _ in range(2))
    lse = torch.randn(b, h, n, generator=gen) * 8
    lse[1, 2, 7] = lse[0, 0, 39] = float("-inf")
    delta = torch.full((b, h, n), float("nan"))
    buffer = torch.full((b * h * n + 8,), float("nan"))  # poisoned, with a tail nothing may write
    got = buffer[: b * h * n].view(b, h, n)
    interp.preprocess(out, dout, None, delta, torch.empty(0), d, lse=lse, lse_log2=got)
    want = torch.where(lse.isneginf(), float("inf"), lse.double() * math.log2(math.e))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert buffer[b * h * n:].isnan().all()
    torch.testing.assert_close(delta.double(), (out.double() * dout.double()).sum(-1), rtol=1e-5, atol=1e-5)
    # Dropout's 1 / (1-p) folded into both (what the CUTLASS dropout backward takes): lse_log2 -
    # log2(1 / (1-p)), delta (1-p); -inf rows stay +inf.
    p = 0.3
    got.fill_(float("nan"))
    delta.fill_(float("nan"))
    interp.preprocess(out, dout, None, delta, torch.empty(0), d, lse=lse, lse_log2=got, keep_scale=1 / (1 - p))
    torch.testing.assert_close(got.double(), want - math.log2(1 / (1 - p)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(delta.double(), (out.double() * dout.double()).sum(-1) * (1 - p), rtol=1e-5, atol=1e-5)


@interpreted
def test_dropout_philox_header_draws_the_triton_mask(interp, tmp_path):
    """csrc/dropout_philox.h, compiled as host C++, draws the Triton forward's keep mask bit for
    bit: what a CUDA forward with dropout must do for the Triton backward to regenerate its mask
    (key groups of the accumulator layout, the seed's two words, a negative offset's fold)."""
    import shutil

    from flash_inductor.cutlass_build import CSRC

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    B, Hq, Hkv, Nq, Nk, D, p = 2, 2, 1, 19, 72, 16, 0.3
    gen = torch.Generator().manual_seed(5)
    q, k = _randn((B, Hq, Nq, D), torch.float32, gen), _randn((B, Hkv, Nk, D), torch.float32, gen)
    seed = torch.tensor([0x123456789ABCDEF, -77])
    keep = _dropout_mask(interp, q, k, seed, p)
    (tmp_path / "draw.cc").write_text(_DRAW_MASK_CC)
    subprocess.run([cxx, "-O1", "-std=c++17", f"-I{CSRC}", "draw.cc", "-o", "draw"], cwd=tmp_path, check=True)
    threshold = round(p * (1 << interp.DROPOUT_BITS.value))
    drawn = subprocess.run([str(tmp_path / "draw"), *map(str, (*seed.tolist(), B, Hq, Nq, Nk, threshold))],
                           capture_output=True, text=True, check=True).stdout
    assert len(drawn) == keep.numel()
    from_header = torch.tensor([c == "1" for c in drawn]).view(B, Hq, Nq, Nk)
    assert torch.equal(from_header, keep), f"{(from_header != keep).sum().item()} of {keep.numel()} bits differ"


@interpreted
def test_torch_philox_mask_draws_the_triton_mask(interp):
    """tests/philox_mask.py (the GPU tests' reference for any CUDA forward's dropout, at any size)
    draws the Triton forward's keep mask bit for bit: a 64-bit key with its top bit set, a
    negative offset, a length that ends inside a 32-key span, grouped KV heads."""
    from philox_mask import keep_mask

    B, Hq, Hkv, Nq, Nk, D, p = 2, 4, 2, 23, 77, 16, 0.37
    gen = torch.Generator().manual_seed(8)
    q, k = _randn((B, Hq, Nq, D), torch.float32, gen), _randn((B, Hkv, Nk, D), torch.float32, gen)
    seed = torch.tensor([-0x123456789ABCDEF, -5])
    keep = _dropout_mask(interp, q, k, seed, p)
    assert torch.equal(keep_mask(seed, B, Hq, Nq, Nk, p), keep)


@pytest.mark.parametrize(
    "shape", [(2, 2, 1, 5, 0, 8), (2, 2, 1, 0, 5, 8), (0, 2, 1, 5, 5, 8)], ids=["nk0", "nq0", "b0"]
)
@interpreted
def test_empty_sizes(interp, shape):
    B, Hq, Hkv, Nq, Nk, D = shape
    q, k, v = torch.randn(B, Hq, Nq, D), torch.randn(B, Hkv, Nk, D), torch.randn(B, Hkv, Nk, D)
    bias = torch.randn(Nq, Nk)
    inp = validate(q, k, v, bias)
    out, lse = interp.forward(inp, None)
    assert out.shape == (B, Hq, Nq, D) and lse.shape == (B, Hq, Nq)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv, dbias = interp.backward(inp, None, out, lse, torch.randn_like(out), None, True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dbias.shape == bias.shape
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all() and (dbias == 0).all()


# ---- mask-like biases: skipped and bias-free tiles (flash_inductor/kernels/mask_tiles.py) -----


def _hf_mask(lengths, Nq, Nk, *, causal_in_mask, left, kind, dtype=torch.float32):
    """The mask a HuggingFace model builds from a padding attention_mask: [B, 1, Nq|1, Nk],
    `where(keep, 0, finfo(dtype).min)` (kind 'float') or the keep-mask itself ('bool')."""
    keys = torch.arange(Nk)
    real = torch.stack([(keys >= Nk - n) if left else (keys < n) for n in lengths])  # [B, Nk]
    keep = real[:, None, None, :]
    if causal_in_mask:
        keep = keep & (keys[None, :] <= torch.arange(Nq)[:, None] + (Nk - Nq))
    if kind == "bool":
        return keep
    return torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)


# (B, Hq, Hkv, Nq, Nk, lengths, causal flag, causal in mask, left padding, kind, dtype)
MASK_CASES = {
    # BERT: key padding only, [B, 1, 1, Nk]; tiles past a sequence's end are skipped.
    "key_padding": (2, 2, 1, 70, 70, (70, 33), False, False, False, "float", torch.float32),
    # LLaMA/GPT-2 under HF: causal and padding in one [B, 1, N, N] float mask, causal flag off.
    "causal_in_mask_right_padding": (2, 2, 2, 75, 75, (75, 40), False, True, False, "float", torch.float32),
    # Left padding (generation): the first rows of sequence 1 have no real key: fully masked.
    "causal_in_mask_left_padding": (2, 2, 1, 75, 75, (75, 40), False, True, True, "float", torch.float32),
    # A sequence of padding only: every row dead.
    "all_padding": (2, 2, 1, 40, 70, (70, 0), False, False, False, "float", torch.float32),
    "bool_mask_causal_flag": (2, 4, 2, 75, 75, (60, 20), "top_left", False, False, "bool", torch.float32),
    "float_mask_bottom_right_nq_lt_nk": (1, 2, 1, 40, 100, (90,), "bottom_right", False, False, "float", torch.float32),
    # fp16 fills with -65504: read as a plain bias (nothing skipped), still exact.
    "fp16_fill_not_skipped": (2, 2, 1, 70, 70, (70, 33), False, True, False, "float", torch.float16),
    # (bfloat16 is covered on the GPU: the interpreter's bfloat16 dots are wrong on Triton 3.9.)
}


@pytest.mark.parametrize("case", list(MASK_CASES))
@interpreted
def test_mask_like_bias(interp, poisoned, monkeypatch, case):
    """Forward, backward and the bias gradient with tiles skipped, against float64 autograd."""
    monkeypatch.setattr(interp.mask_tiles, "MIN_FLOPS", 0)  # these shapes are below the map's cost
    B, Hq, Hkv, Nq, Nk, lengths, causal, in_mask, left, kind, dtype = MASK_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q = _randn((B, Hq, Nq, 16), dtype, gen)
    k = _randn((B, Hkv, Nk, 16), dtype, gen)
    v = _randn((B, Hkv, Nk, 24), dtype, gen)
    bias = _hf_mask(lengths, Nq, Nk, causal_in_mask=in_mask, left=left, kind=kind, dtype=dtype)
    assert interp.mask_tiles.worth_it(validate(q, k, v, bias, causal=causal))
    _check_against_ref(interp, poisoned, q, k, v, bias, causal, gen)


@interpreted
def test_mask_tiles_listed_apart(interp, poisoned, monkeypatch):
    """Tiles that are not consecutive (a masked hole between kept keys, kept rows below a
    skipped one) are looped over from their lists; consecutive ones as a range
    (`_listed_range`). Both against float64, with the map checked to hold such lists."""
    monkeypatch.setattr(interp.mask_tiles, "MIN_FLOPS", 0)
    gen = torch.Generator().manual_seed(zlib.crc32(b"listed_apart"))
    q, k, v = (_randn((2, 2, 100, 16), torch.float32, gen) for _ in range(3))
    keep = torch.ones(2, 1, 100, 100, dtype=torch.bool)
    keep[:, :, :, 32:64] = False  # key tile 1 of every row: full lists [0, 2]
    keep[1, :, 32:64, :] = False  # query tile 1 of sequence 1 sees nothing: dK/dV lists [0, 2]
    keep[1, :, 70:, 5] = False  # partial tiles beside full ones
    st = _states(interp, q, k, v, keep, False)
    S, P, F = 0, 1, 2
    assert st[0, 0, 0].tolist() == [F, S, F, P] and st[1, 0, :, 0].tolist() == [F, S, P, P]
    _check_against_ref(interp, poisoned, q, k, v, keep, False, gen)


def _states(interp, q, k, v, bias, causal):
    """The tile kinds mask_tiles finds: [Bb, Hb, query tiles, key tiles] of 0/1/2 (skip/partial/full)."""
    mt = interp.mask_tiles
    inp = validate(q, k, v, bias, causal=causal)
    b, sb = interp._bias_args(inp, q)
    tiles = mt.classify(inp, b, sb, interp._direct)
    state = torch.zeros(tiles.bb, tiles.hb, tiles.mt, tiles.nt, dtype=torch.int64)
    for kind, value in ((0, mt.PARTIAL), (1, mt.FULL)):
        for idx in torch.cartesian_prod(*(torch.arange(n) for n in (tiles.bb, tiles.hb, tiles.mt))):
            n = int(tiles.counts_q[(kind, *idx)])
            state[(*idx,)][tiles.tiles_q[(kind, *idx)][:n].long()] = value
    # The dK/dV lists are the same map, transposed.
    state_k = torch.zeros_like(state.transpose(-1, -2))
    for kind, value in ((0, mt.PARTIAL), (1, mt.FULL)):
        for idx in torch.cartesian_prod(*(torch.arange(n) for n in (tiles.bb, tiles.hb, tiles.nt))):
            n = int(tiles.counts_k[(kind, *idx)])
            state_k[(*idx,)][tiles.tiles_k[(kind, *idx)][:n].long()] = value
    assert torch.equal(state_k.transpose(-1, -2), state)
    return state


def test_mask_tiles_only_where_they_can_repay_their_launches():
    """The map costs launches: a BERT-base layer (8 × 512, 6.4 GFLOP) reads its mask in the dense
    loops, a LLaMA-style layer at 4096 tokens classifies it; a learned per-head bias never does."""
    from flash_inductor.kernels import mask_tiles

    def inp(B, H, N, D, heads_in_bias=1):
        q = torch.empty(B, H, N, D, device="meta")
        bias = torch.empty(B, heads_in_bias, 1, N, device="meta")
        return validate(q, q, q, bias)

    bert, llama = inp(8, 12, 512, 64), inp(1, 32, 4096, 64)
    assert mask_tiles.mask_like(bert) and not mask_tiles.worth_it(bert)
    assert mask_tiles.worth_it(llama)
    assert not mask_tiles.mask_like(inp(1, 32, 4096, 64, heads_in_bias=32))


def test_default_config_follows_the_head_dim(monkeypatch):
    """With autotuning off, head dims up to 64 run 64 × 64 tiles (config_sweep.py's finding on
    the e2e shapes; 2 stages for BERT's fused dropout dK/dV), except the forward and dQ of a long
    non-causal row; larger head dims keep
    the first config of the list. With autotuning on, every fitting candidate stays."""
    import triton

    from flash_inductor.kernels import triton_attention as ta

    candidates = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                  for m, n, w, s in ((128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2))]

    def chosen(kernel, d, n_bucket, causal, bias=False, fused_dq=False):
        args = dict(BLOCK_D=d, BLOCK_DV=d, ELT_BYTES=2, N_BUCKET=n_bucket, CAUSAL=causal, HAS_BIAS=bool(bias),
                    BIAS_IS_BOOL=bias == "bool", FUSED_DQ=fused_dq)
        (c,) = ta._prune("BLOCK_N", "BLOCK_M", kernel)(list(candidates), args)
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    monkeypatch.setenv(ta.AUTOTUNE_ENV, "0")
    for kernel in ("fwd", "dkdv", "dq"):
        assert chosen(kernel, 64, 512, 0) == (64, 64, 4, 3)
        assert chosen(kernel, 32, 8192, 1) == (64, 64, 4, 3)
        assert chosen(kernel, 128, 512, 0) == (128, 64, 8, 3)
    assert chosen("fwd", 64, 8192, 0) == chosen("dq", 64, 16384, 0) == (128, 64, 8, 3)
    assert chosen("dkdv", 64, 8192, 0) == (64, 64, 4, 3)
    # A bias at head dim 128 up to N = 4096, or a float one at any length with a causal mask:
    # dK/dV streams 32 queries past 64 keys.
    assert chosen("dkdv", 128, 4096, 0, bias=True) == chosen("dkdv", 128, 8192, 1, bias=True) == (32, 64, 4, 2)
    assert chosen("dkdv", 128, 8192, 0, bias=True) == chosen("dq", 128, 2048, 1, bias=True) == (128, 64, 8, 3)
    assert chosen("dkdv", 128, 8192, 1, bias="bool") == (128, 64, 8, 3)
    # BERT's training backward (a padding bias, dropout's fused dQ, no causal mask) at head dim
    # 64: 2 stages, which do not spill in the loop; with causal, or without the bias, 3.
    assert chosen("dkdv", 64, 512, 0, bias=True, fused_dq=True) == (64, 64, 4, 2)
    assert chosen("dkdv", 64, 512, 1, bias=True, fused_dq=True) == chosen("dkdv", 64, 512, 0, fused_dq=True) == (64, 64, 4, 3)
    monkeypatch.setenv(ta.AUTOTUNE_ENV, "1")
    kept = ta._prune("BLOCK_N", "BLOCK_M", "fwd")(list(candidates), dict(
        BLOCK_D=64, BLOCK_DV=64, ELT_BYTES=2, N_BUCKET=512, CAUSAL=0))
    assert len(kept) == len(candidates) and kept[0].kwargs == {"BLOCK_M": 64, "BLOCK_N": 64}


@pytest.mark.skipif(INTERPRETING, reason="the interpreter runs one config per kernel")
def test_tuning_in_a_graph_follows_max_autotune(monkeypatch):
    """Unset, the environment leaves eager launches tuning and launches traced into an Inductor
    graph tuning only under max_autotune; set, it decides everywhere."""
    from flash_inductor.kernels import triton_attention as ta

    args = dict(BLOCK_D=64, BLOCK_DV=64, ELT_BYTES=2, N_BUCKET=512, CAUSAL=0)

    def kept():
        return len(ta._prune("BLOCK_N", "BLOCK_M", "fwd")(list(ta._FWD_CONFIGS), args))

    monkeypatch.delenv(ta.AUTOTUNE_ENV, raising=False)
    assert ta.autotuning() and kept() > 1
    with ta.tuning_in_graph(False):
        assert not ta.autotuning() and kept() == 1
        with ta.tuning_in_graph(True):
            assert ta.autotuning() and kept() > 1
        assert not ta.autotuning()
    assert ta.autotuning()
    for setting, expected in (("1", True), ("0", False)):
        monkeypatch.setenv(ta.AUTOTUNE_ENV, setting)
        for in_graph in (False, True):
            with ta.tuning_in_graph(in_graph):
                assert ta.autotuning() is expected


@pytest.mark.skipif(INTERPRETING, reason="the interpreter runs one config per kernel")
def test_eight_warp_candidates_only_above_head_dim_128(monkeypatch):
    """Head dims above 128 also try 8-warp tiles (their 4-warp candidates spill registers), and
    their dK/dV default is one; the D <= 128 candidate lists are what they were."""
    from flash_inductor.kernels import triton_attention as ta

    monkeypatch.setenv(ta.AUTOTUNE_ENV, "1")
    for kernel, configs, streamed, resident in (("fwd", ta._FWD_CONFIGS, "BLOCK_N", "BLOCK_M"),
                                                ("dkdv", ta._DKDV_CONFIGS, "BLOCK_M", "BLOCK_N"),
                                                ("dq", ta._DQ_CONFIGS, "BLOCK_N", "BLOCK_M")):
        for d in (64, 128, 256):
            kept = ta._prune(streamed, resident, kernel)(list(configs), dict(
                BLOCK_D=d, BLOCK_DV=d, ELT_BYTES=2, N_BUCKET=8192, CAUSAL=0))
            wide = [c for c in kept if id(c) in ta._LARGE_HEAD_ONLY]
            assert bool(wide) == (d > 128), (kernel, d)
            assert all(c.num_warps == 8 for c in wide)
    # With autotuning off, the dK/dV kernel and the forward at head dim 256 run their 8-warp
    # defaults; the forward's fits once its estimate counts q alone as resident (192 KiB).
    monkeypatch.setenv(ta.AUTOTUNE_ENV, "0")
    for kernel, configs, streamed, resident in (("dkdv", ta._DKDV_CONFIGS, "BLOCK_M", "BLOCK_N"),
                                                ("fwd", ta._FWD_CONFIGS, "BLOCK_N", "BLOCK_M")):
        (c,) = ta._prune(streamed, resident, kernel)(list(configs), dict(
            BLOCK_D=256, BLOCK_DV=256, ELT_BYTES=2, N_BUCKET=2048, CAUSAL=1))
        assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == ta._LARGE_HEAD_DEFAULTS[kernel]


@pytest.mark.skipif(INTERPRETING, reason="compiles for sm_90; the interpreter compiles nothing")
@pytest.mark.parametrize("kernel,config,head_dim", [
    ("fwd", (64, 64, 4, 3), 64), ("fwd", (128, 64, 8, 3), 128), ("dq", (64, 64, 4, 3), 64),
])
def test_dropout_moves_nothing_between_threads(kernel, config, head_dim):
    """docs/design.md §4: a Philox call's 8 draws are the 8 scores one thread holds in the tensor
    cores' accumulator, so dropout adds no layout conversion (a shared-memory round trip per
    tile) to the forward or the dQ kernel. The earlier grouping (8 adjacent keys) added 10."""
    probe = _sm90_probe()
    plain, dropout = (probe.layout_conversions(_sm90_compile(probe, kernel, *config, head_dim, d, 0, False))
                      for d in (False, True))
    assert dropout == plain


@pytest.mark.skipif(INTERPRETING, reason="compiles for sm_90; the interpreter compiles nothing")
@pytest.mark.parametrize("kernel,config", [("dq", (128, 64, 8, 3)), ("dkdv", (32, 64, 4, 2)), ("dkdv", (64, 128, 8, 3))])
def test_a_float_bias_adds_no_select_to_the_backward_loops(kernel, config):
    """docs/design.md §19: the backward adds a float bias as one FMA per score and never masks
    entries <= MASKED_BIAS one by one, so every key (dQ) or query (dK/dV) loop compares and
    selects as often with a bias as without one (session 13's backward added a compare and a
    select per score)."""
    probe = _sm90_probe()
    plain, biased = (
        [(ops["FSETP"], ops["FSEL"]) for _, ops in probe.loop_counts(_sm90_compile(probe, kernel, *config, 128, False, 0, b))
         if ops["HGMMA"]]
        for b in (False, True)
    )
    if not plain:
        pytest.skip("no cuobjdump to read SASS with")
    assert biased == plain


def _sm90_probe():
    """benchmarks/ttgir_probe.py, which compiles our kernels for sm_90 without a GPU."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "ttgir_probe.py"
    spec = importlib.util.spec_from_file_location("ttgir_probe", path)
    probe = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(probe)
    except ImportError as e:
        pytest.skip(f"cannot compile for sm_90 here: {e}")
    return probe


def _sm90_compile(probe, *args):
    try:
        return probe.compile_kernel(*args)
    except (ImportError, RuntimeError) as e:  # a Triton without its CUDA backend
        pytest.skip(f"cannot compile for sm_90 here: {e}")


@interpreted
def test_mask_tiles_are_classified(interp):
    """The map itself (TILE = 32 under the interpreter): what is skipped, what is read."""
    q, k, v = torch.randn(2, 2, 75, 16), torch.randn(2, 1, 75, 16), torch.randn(2, 1, 75, 16)
    S, P, F = 0, 1, 2
    # Causal + right padding (75 and 40 real tokens) in one float mask, causal flag off.
    bias = _hf_mask((75, 40), 75, 75, causal_in_mask=True, left=False, kind="float")
    st = _states(interp, q, k, v, bias, False)
    assert st.shape == (2, 1, 3, 3)
    assert st[0, 0].tolist() == [[P, S, S], [F, P, S], [F, F, P]]
    assert st[1, 0].tolist() == [[P, S, S], [F, P, S], [F, P, S]]
    # Left padding: sequence 1's first 35 rows see no real key; masked tiles are skipped all
    # the same (a row of masked entries is fully masked: zeros, lse = -inf), float or bool.
    for kind in ("float", "bool"):
        bias = _hf_mask((75, 40), 75, 75, causal_in_mask=True, left=True, kind=kind)
        st = _states(interp, q, k, v, bias, False)
        assert st[1, 0].tolist() == [[S, S, S], [S, P, S], [S, P, P]], kind
    # Key padding [B, 1, 1, Nk] with the causal flag: the flag's triangle is folded in.
    bias = _hf_mask((75, 40), 75, 75, causal_in_mask=False, left=False, kind="float")
    st = _states(interp, q, k, v, bias, "top_left")
    assert st[1, 0].tolist() == [[P, S, S], [F, P, S], [F, P, S]]
    # Key padding [B, 1, 1, Nk] without a causal flag: one row read per key tile
    # (`_classify_shared_rows`), the same kinds for every query tile.
    for kind in ("float", "bool"):
        bias = _hf_mask((75, 40), 75, 75, causal_in_mask=False, left=False, kind=kind)
        st = _states(interp, q, k, v, bias, False)
        assert st[0, 0].tolist() == [[F, F, P]] * 3 and st[1, 0].tolist() == [[F, P, S]] * 3, kind
    # fp16's fill (-65504) is an ordinary bias value: nothing is skipped; all-zero tiles are full.
    bias = _hf_mask((75, 40), 75, 75, causal_in_mask=True, left=False, kind="float", dtype=torch.float16)
    st = _states(interp, q.half(), k.half(), v.half(), bias, False)
    assert st[1, 0].tolist() == [[P, P, P], [F, P, P], [F, P, P]]


# ---- packed variable-length batches (VARLEN) ---------------------------------------------------


def _packed(lengths_q, lengths_k, hq, hkv, d, dv, dtype, gen, device="cpu"):
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=device)  # noqa: E731
    q = _randn((sum(lengths_q), hq, d), dtype, gen).to(device)
    k = _randn((sum(lengths_k), hkv, d), dtype, gen).to(device)
    v = _randn((sum(lengths_k), hkv, dv), dtype, gen).to(device)
    return q, k, v, cu(lengths_q), cu(lengths_k)


def _check_varlen(kernels, run, lengths_q, lengths_k, hq, hkv, d, dv, dtype, causal, gen, device="cpu"):
    """forward_varlen / backward_varlen against the per-sequence float64 reference."""
    from flash_inductor import varlen

    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, hq, hkv, d, dv, dtype, gen, device)
    c = int(Causal.parse(causal))
    scale = d ** -0.5
    out, lse = run(kernels.forward_varlen, q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), c, scale, 0.0, None)
    dout = _randn(out.shape, dtype, gen).to(device)
    grads = run(kernels.backward_varlen, dout, None, q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), None,
                out, lse, c, scale, 0.0)
    args64 = [t.double() for t in (q, k, v)]
    o64, l64 = varlen._reference_forward(*args64, cu_q, cu_k, c, scale, 0.0, 0.0, None)
    g64 = varlen._reference_backward(dout.double(), None, *args64, cu_q, cu_k, None, o64, l64, c, scale, 0.0, 0.0)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(l64))
    finite = torch.isfinite(l64)
    torch.testing.assert_close(lse.double()[finite], l64[finite], rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-3)
    args_lo = [t.to(dtype) for t in args64]
    o_lo, l_lo = varlen._reference_forward(*args_lo, cu_q, cu_k, c, scale, 0.0, 0.0, None)
    g_lo = varlen._reference_backward(dout, None, *args_lo, cu_q, cu_k, None, o_lo, l_lo, c, scale, 0.0, 0.0)
    for name, got, r64, rlo in zip(("out", "dq", "dk", "dv"), (out, *grads), (o64, *g64), (o_lo, *g_lo)):
        assert got.shape == r64.shape and torch.isfinite(got).all(), name
        bound = 2 * _rel(rlo, r64) + FLOOR[dtype]
        err = _rel(got, r64)
        assert err <= bound, f"{name}: relative error {err:.3g} > bound {bound:.3g}"


# (query lengths, key lengths, Hq, Hkv, D, Dv, dtype, causal)
VARLEN_CASES = {
    "ragged_gqa": ((37, 5, 64, 1), (37, 5, 64, 1), 4, 2, 16, 24, torch.float32, False),
    "ragged_top_left": ((37, 5, 64, 20), (37, 5, 64, 20), 2, 1, 16, 16, torch.float32, "top_left"),
    # Prefill with a cache: each sequence's queries are the last of its keys.
    "bottom_right_nq_ne_nk": ((5, 33, 17), (40, 33, 9), 2, 2, 24, 16, torch.float32, "bottom_right"),
    # Sequences without queries or without keys: nothing computed, zeros and lse = -inf.
    "empty_sequences": ((5, 0, 37, 20), (7, 3, 37, 0), 4, 2, 16, 24, torch.float32, False),
    "fp16": ((50, 13), (50, 13), 2, 2, 32, 32, torch.float16, "top_left"),
}


@pytest.mark.parametrize("case", list(VARLEN_CASES))
@interpreted
def test_varlen_forward_backward(interp, poisoned, case):
    lq, lk, hq, hkv, d, dv, dtype, causal = VARLEN_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    _check_varlen(interp, poisoned, lq, lk, hq, hkv, d, dv, dtype, causal, gen)


@interpreted
def test_varlen_equal_lengths_is_the_dense_batch_dropout_included(interp):
    """A packed batch of equal lengths is the dense batch: same out, lse and grads, and the
    same dropout mask (sequence b draws as batch entry b does)."""
    B, Hq, Hkv, N, D, p = 3, 4, 2, 37, 16, 0.2
    gen = torch.Generator().manual_seed(21)
    q, k, v, cu_q, cu_k = _packed((N,) * B, (N,) * B, Hq, Hkv, D, D, torch.float32, gen)
    dense = lambda t: t.unflatten(0, (B, N)).transpose(1, 2)  # noqa: E731
    seed = torch.tensor([5, 9])
    for causal in (0, 1):
        inp = validate(dense(q), dense(k), dense(v), causal=bool(causal), dropout_p=p)
        out_d, lse_d = interp.forward(inp, seed)
        out, lse = interp.forward_varlen(q, k, v, cu_q, cu_k, N, N, causal, inp.scale, p, seed)
        torch.testing.assert_close(dense(out), out_d, rtol=0, atol=1e-6)
        torch.testing.assert_close(lse.unflatten(0, (B, N)).transpose(1, 2), lse_d, rtol=0, atol=1e-6)
        dout = torch.randn(out.shape, generator=gen)
        g_d = interp.backward(inp, seed, out_d, lse_d, dense(dout), None, False)
        g = interp.backward_varlen(dout, None, q, k, v, cu_q, cu_k, N, N, seed, out, lse, causal, inp.scale, p)
        for got, want in zip(g, g_d[:3]):
            torch.testing.assert_close(dense(got), want, rtol=0, atol=1e-5)


@interpreted
def test_varlen_op_dispatches_to_triton(interp):
    """Under the interpreter the public varlen entry picks Triton (its `varlen_fwd` runs it), and
    agrees with the reference forced, forward and backward."""
    from flash_inductor import attention_varlen, dispatch
    from flash_inductor.varlen import _select

    gen = torch.Generator().manual_seed(4)
    q, k, v, cu_q, cu_k = _packed((9, 30), (9, 30), 2, 2, 16, 16, torch.float32, gen)
    assert _select(q, k, v, 1, 0.25, 0.0, 0.0).NAME == "triton"
    results = []
    for forced in (None, "reference"):
        dispatch.config.kernel = forced
        try:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = attention_varlen(*leaves, cu_q, cu_k, 30, 30, causal=True)
            out.backward(torch.ones_like(out))
            results.append((out.detach(), *(t.grad for t in leaves)))
        finally:
            dispatch.config.kernel = None
    for a, b in zip(*results):
        assert _rel(a, b.double()) < 1e-5


# ---- real sizes on CUDA ----------------------------------------------------------------------

GPU_CASES = {
    "fp16_d64_plain": (2, 8, 8, 1024, 1024, 64, 64, torch.float16, False, None),
    "bf16_d128_gqa_top_left": (2, 8, 2, 1000, 1000, 128, 128, torch.bfloat16, "top_left", None),
    "fp16_d96_mqa_bottom_right_bias": (1, 8, 1, 777, 1031, 96, 96, torch.float16, "bottom_right", "heads_rows_keys"),
    "bf16_d256_bool": (1, 4, 2, 513, 700, 256, 256, torch.bfloat16, False, "bool"),
    "fp32_d40_batch_keys_bias": (2, 4, 2, 300, 257, 40, 24, torch.float32, "top_left", "batch_keys"),
    "fp16_d80_nq_gt_nk": (2, 4, 4, 900, 300, 80, 80, torch.float16, "bottom_right", "rows_keys"),
    "bf16_d128_full_bias_causal": (2, 4, 4, 1100, 1100, 128, 128, torch.bfloat16, "top_left", "full"),
    "bf16_d192_plain": (1, 4, 4, 640, 640, 192, 192, torch.bfloat16, False, None),
    "bf16_t5_position_bias": (8, 12, 12, 512, 512, 64, 64, torch.bfloat16, False, "keys_strided"),
}


@pytest.fixture(scope="module")
def compiled():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels would not be compiled")
    return importlib.import_module(KERNEL_MODULE)


def _to_cuda(*ts):
    return [t.cuda() if t is not None else None for t in ts]


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_forward_backward(compiled, poisoned, monkeypatch, case):
    # One config per kernel: autotuning every case would compile ~30 variants each.
    monkeypatch.setenv(compiled.AUTOTUNE_ENV, "0")
    _gpu_case(compiled, poisoned, case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fp16_d64_plain", "bf16_d128_gqa_top_left", "bf16_d256_bool", "bf16_d192_plain"])
def test_gpu_fused_dq(compiled, poisoned, monkeypatch, case):
    """The one-kernel backward (dQ by atomics), forced on without dropout, at real sizes."""
    monkeypatch.setenv(compiled.AUTOTUNE_ENV, "0")
    monkeypatch.setenv(compiled.FUSED_DQ_ENV, "1")
    _gpu_case(compiled, poisoned, case)


def _gpu_case(compiled, poisoned, case):
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype, causal, bias_kind = GPU_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q = _randn((B, Hq, Nq, D), dtype, gen, "bnhd")
    k = _randn((B, Hkv, Nk, D), dtype, gen)
    v = _randn((B, Hkv, Nk, Dv), dtype, gen)
    bias = _bias(bias_kind, B, Hq, Nq, Nk, dtype, gen)
    q, k, v, bias = _to_cuda(q, k, v, bias)
    _check_against_ref(compiled, poisoned, q, k, v, bias, causal, gen)


# (B, Hq, Hkv, Nq, Nk, D, dtype, causal, bias kind, cap, q scale): Gemma 2's cap is 50 on scores
# of size ~1, which barely bends them; q is scaled up in those rows so tanh saturates somewhere.
GPU_SOFTCAP_CASES = {
    "bf16_d256_gemma2_gqa_causal_mask": (2, 8, 4, 700, 700, 256, torch.bfloat16, "top_left", "batch_keys", 50.0, 8.0),
    "fp16_d128_bias_grad": (1, 4, 4, 513, 600, 128, torch.float16, "bottom_right", "heads_rows_keys", 5.0, 2.0),
    "fp32_d64_bool": (2, 4, 2, 300, 257, 64, torch.float32, False, "bool", 2.0, 1.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_SOFTCAP_CASES))
def test_gpu_softcap(compiled, poisoned, monkeypatch, case):
    monkeypatch.setenv(compiled.AUTOTUNE_ENV, "0")
    B, Hq, Hkv, Nq, Nk, D, dtype, causal, bias_kind, cap, q_scale = GPU_SOFTCAP_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q = (_randn((B, Hq, Nq, D), torch.float32, gen) * q_scale).to(dtype)
    k = _randn((B, Hkv, Nk, D), dtype, gen)
    v = _randn((B, Hkv, Nk, D), dtype, gen)
    bias = _bias(bias_kind, B, Hq, Nq, Nk, dtype, gen)
    q, k, v, bias = _to_cuda(q, k, v, bias)
    _check_against_ref(compiled, poisoned, q, k, v, bias, causal, gen, softcap=cap)


@pytest.mark.gpu
def test_gpu_autotuned_dropout_matches_forward_mask(compiled, poisoned):
    """Full autotuning on, with dropout: every config must regenerate the same mask."""
    B, Hq, Hkv, Nq, Nk, D, p = 2, 8, 2, 500, 128, 64, 0.2
    gen = torch.Generator().manual_seed(5)
    q, k, v = _to_cuda(*(_randn(s, torch.float16, gen) for s in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Nk))))
    seed = torch.tensor([99, 7], device="cuda")
    keep = _dropout_mask(compiled, q, k, seed, p, "top_left")
    inp = validate(q, k, v, causal="top_left", dropout_p=p)
    out, lse = poisoned(compiled.forward, inp, seed)
    dout = _randn(out.shape, torch.float16, gen).cuda()
    grads = poisoned(compiled.backward, inp, seed, out, lse, dout, None, False)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, _ = _dense64(*leaves, None, "top_left", inp.scale, drop_keep=keep, p=p)
    out64.backward(dout.double())
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (out64, *(t.grad for t in leaves))):
        assert torch.isfinite(got).all(), name
        assert _rel(got, ref.detach()) < 1e-2, name


@pytest.mark.gpu
def test_gpu_public_op_dispatches_to_triton(compiled):
    import flash_inductor
    from flash_inductor import dispatch

    gen = torch.Generator().manual_seed(0)
    q, k, v = _to_cuda(*(_randn((2, 4, 256, 64), torch.bfloat16, gen) for _ in range(3)))
    assert dispatch.select(validate(q, k, v)).NAME == "triton"
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = flash_inductor.attention(*leaves, causal=True)
    out.sum().backward()
    ref = attention_ref(*(t.detach().double() for t in leaves), causal=True)
    assert _rel(out.detach(), ref) < 2e-2
    assert all(torch.isfinite(t.grad).all() for t in leaves)


# (B, Hq, Hkv, N, D, lengths, causal flag, causal in mask, left padding, kind, dtype)
GPU_MASK_CASES = {
    "bf16_llama_mask_right_padding": (2, 8, 2, 1000, 128, (1000, 617), False, True, False, "float", torch.bfloat16),
    "bf16_llama_mask_left_padding": (2, 8, 2, 700, 64, (700, 301), False, True, True, "float", torch.bfloat16),
    "fp16_bert_key_padding": (3, 4, 4, 900, 64, (900, 129, 511), False, False, False, "float", torch.float16),
    "bf16_bool_key_padding_causal_flag": (2, 4, 4, 777, 128, (777, 300), "top_left", False, False, "bool", torch.bfloat16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_MASK_CASES))
def test_gpu_mask_like_bias(compiled, poisoned, monkeypatch, case):
    """HF masks at real sizes: skipped, full and partial tiles (mask_tiles.py) against float64."""
    monkeypatch.setenv(compiled.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(compiled.mask_tiles, "MIN_FLOPS", 0)
    B, Hq, Hkv, N, D, lengths, causal, in_mask, left, kind, dtype = GPU_MASK_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q, k, v = (_randn((B, h, N, D), dtype, gen) for h in (Hq, Hkv, Hkv))
    bias = _hf_mask(lengths, N, N, causal_in_mask=in_mask, left=left, kind=kind, dtype=dtype)
    q, k, v, bias = _to_cuda(q, k, v, bias)
    assert compiled.mask_tiles.worth_it(validate(q, k, v, bias, causal=causal))
    _check_against_ref(compiled, poisoned, q, k, v, bias, causal, gen)


@pytest.mark.gpu
def test_gpu_mask_tiles_listed_apart(compiled, poisoned, monkeypatch):
    """Tiles that are not consecutive go through the lists, consecutive ones as a range
    (`_listed_range`), in the compiled kernels' pipelined loops; bf16 at TILE = 128."""
    monkeypatch.setenv(compiled.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(compiled.mask_tiles, "MIN_FLOPS", 0)
    gen = torch.Generator().manual_seed(zlib.crc32(b"gpu_listed_apart"))
    q, k, v = (_randn((2, 4, 700, 128), torch.bfloat16, gen) for _ in range(3))
    keep = torch.ones(2, 1, 700, 700, dtype=torch.bool)
    keep[:, :, :, 128:256] = False
    keep[1, :, 128:256, :] = False
    keep[1, :, 300:, 5] = False
    q, k, v, keep = _to_cuda(q, k, v, keep)
    _check_against_ref(compiled, poisoned, q, k, v, keep, False, gen)


GPU_VARLEN_CASES = {
    "bf16_ragged_causal": ((1000, 17, 513, 2048), (1000, 17, 513, 2048), 8, 2, 128, 128, torch.bfloat16, "top_left"),
    "fp16_ragged_bottom_right": ((300, 0, 129), (700, 64, 129), 4, 4, 64, 64, torch.float16, "bottom_right"),
    "bf16_d96_gqa": ((777, 1234), (777, 1234), 8, 1, 96, 96, torch.bfloat16, False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_VARLEN_CASES))
def test_gpu_varlen(compiled, poisoned, monkeypatch, case):
    monkeypatch.setenv(compiled.AUTOTUNE_ENV, "0")
    lq, lk, hq, hkv, d, dv, dtype, causal = GPU_VARLEN_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    _check_varlen(compiled, poisoned, lq, lk, hq, hkv, d, dv, dtype, causal, gen, device="cuda")


@pytest.mark.gpu
def test_gpu_nested_tensor_runs_the_triton_varlen_kernel(compiled):
    """A jagged nested batch through `attention`, eager and compiled, forward and backward."""
    import flash_inductor
    from flash_inductor.varlen import _select

    gen = torch.Generator().manual_seed(1)
    lengths = (300, 45, 1024)
    seqs = [[_randn((n, 8, 64), torch.bfloat16, gen).cuda() for n in lengths] for _ in range(3)]
    q, k, v = (torch.nested.nested_tensor(s, layout=torch.jagged).transpose(1, 2).requires_grad_() for s in seqs)
    assert _select(*(t.transpose(1, 2).values() for t in (q, k, v)), 1, 0.125, 0.0, 0.0).NAME == "triton"
    out = flash_inductor.attention(q, k, v, causal=True)
    compiled_out = torch.compile(lambda a, b, c: flash_inductor.attention(a, b, c, causal=True))(q, k, v)
    for o in (out, compiled_out):
        for i in range(len(lengths)):
            qi, ki, vi = (s[i].transpose(0, 1)[None].double() for s in seqs)
            ref = attention_ref(qi, ki, vi, causal=True)[0].transpose(0, 1)
            assert _rel(o.transpose(1, 2).unbind()[i], ref) < 2e-2
    out.transpose(1, 2).values().sum().backward()
    assert all(torch.isfinite(t.grad.values()).all() for t in (q, k, v))
