"""Variable-length input: packed sequences with offsets, and jagged nested tensors.

Ground truth is each sequence run alone through the dense float64 `attention_ref`; bounds by
dtype as in test_op.py. Edge cases: empty query or key sequences, GQA, both causal alignments,
soft-capping, dropout per sequence, bad offsets.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import flash_inductor
from conftest import rel_err
from flash_inductor import attention, attention_ref, attention_varlen, dispatch
from flash_inductor.varlen import varlen_bwd, varlen_fwd

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def default_dispatch(request, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(flash_inductor.config, "kernel", None)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _offsets(lengths, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=dtype)


def _packed(lengths_q, lengths_k, hq, hkv, d, dv, dtype):
    q = torch.randn(sum(lengths_q), hq, d).to(dtype).requires_grad_()
    k = torch.randn(sum(lengths_k), hkv, d).to(dtype).requires_grad_()
    v = torch.randn(sum(lengths_k), hkv, dv).to(dtype).requires_grad_()
    return q, k, v


def _per_sequence_ref(q, k, v, cu_q, cu_k, **kwargs):
    """Each sequence alone through the dense reference; empty key sets give zero rows."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    pieces = []
    for i in range(cu_q.numel() - 1):
        a, b, c, e = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if b == a or e == c:
            pieces.append(out[a:b])
            continue
        o = attention_ref(*(t[s:t2].transpose(0, 1).unsqueeze(0) for t, s, t2 in ((q, a, b), (k, c, e), (v, c, e))), **kwargs)
        pieces.append(o[0].transpose(0, 1))
    return torch.cat(pieces, 0)


def _grads(fn, leaves, dout):
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True))


CASES = {
    # name: (query lengths, key lengths, Hq, Hkv, D, Dv, kwargs)
    "ragged_self": ([5, 17, 1, 9], [5, 17, 1, 9], 2, 2, 16, 16, {}),
    "gqa_causal_top_left": ([5, 17, 9], [5, 17, 9], 4, 2, 16, 24, {"causal": True}),
    "cross_bottom_right": ([3, 11, 6], [7, 11, 2], 2, 1, 32, 32, {"causal": "bottom_right"}),
    "empty_sequences": ([4, 0, 6, 3], [4, 5, 6, 0], 2, 2, 16, 16, {}),
    "softcap_scale": ([8, 13], [8, 13], 2, 2, 16, 16, {"softcap": 2.0, "scale": 0.9}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_packed_against_float64(case, dtype):
    lq, lk, hq, hkv, d, dv, kwargs = case
    q, k, v = _packed(lq, lk, hq, hkv, d, dv, dtype)
    cu_q, cu_k = _offsets(lq), _offsets(lk)
    dout = torch.randn(q.shape[0], hq, dv, dtype=torch.float64)

    def ours(q, k, v):
        return attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), **kwargs)

    def ref(q, k, v):
        return _per_sequence_ref(q, k, v, cu_q, cu_k, **kwargs)

    got = _grads(ours, [q, k, v], dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = _grads(ref, leaves64, dout)
    low = _grads(ref, [t.detach().requires_grad_() for t in (q, k, v)], dout)
    for name, g, w, lo in zip(("out", "dq", "dk", "dv"), got, want, low):
        assert g.dtype == dtype and g.shape == w.shape, name
        bound = 2 * rel_err(lo, w) + FLOOR[dtype]
        assert rel_err(g, w) <= bound, f"{name}: {rel_err(g, w):.3g} > {bound:.3g}"


def test_int64_offsets_and_lse_layout():
    lq = [3, 6]
    q, k, v = _packed(lq, lq, 2, 2, 8, 8, torch.float64)
    cu = _offsets(lq, torch.int64)
    out, lse, _ = varlen_fwd(q, k, v, cu, cu, 6, 6, None, 0, 0.5, 0.0)
    assert out.shape == (9, 2, 8) and lse.shape == (9, 2) and lse.dtype == torch.float64
    s = torch.einsum("qhd,khd->hqk", q[3:9], k[3:9]) * 0.5
    torch.testing.assert_close(lse[3:9].T, torch.logsumexp(s, -1))


def test_nested_tensors_through_attention():
    """SDPA's convention: [B, j, H, D] nested, transposed to [B, H, j, D]; output nested too."""
    lengths, hq, d = [4, 9, 1], 2, 16
    seqs = [[torch.randn(n, hq, d, dtype=torch.float64) for n in lengths] for _ in range(3)]
    q, k, v = (torch.nested.nested_tensor(s, layout=torch.jagged).transpose(1, 2).requires_grad_() for s in seqs)
    out = attention(q, k, v, causal=True)
    assert out.is_nested and out.shape[0] == 3 and out.shape[1] == hq
    for i, n in enumerate(lengths):
        ref = attention_ref(*(s[i].transpose(0, 1).unsqueeze(0) for s in seqs), causal=True)
        torch.testing.assert_close(out.transpose(1, 2)[i].transpose(0, 1), ref[0])
    # Gradients reach the nested leaves and match the per-sequence reference.
    loss = out.values().pow(2).sum()
    dq = torch.autograd.grad(loss, q)[0]
    leaves = [s[1].detach().requires_grad_() for s in seqs]
    ref1 = attention_ref(*(t.transpose(0, 1).unsqueeze(0) for t in leaves), causal=True)
    (dq1,) = torch.autograd.grad(ref1.pow(2).sum(), leaves[:1])
    torch.testing.assert_close(dq.transpose(1, 2)[1], dq1)


def test_nested_matches_padded_dense_with_a_mask():
    """The same ragged batch, padded to the longest and masked: equal on the real tokens."""
    lengths, hq, d = [7, 3, 5], 2, 8
    seqs = [[torch.randn(n, hq, d) for n in lengths] for _ in range(3)]
    nested = [torch.nested.nested_tensor(s, layout=torch.jagged).transpose(1, 2) for s in seqs]
    out = attention(*nested)
    n = max(lengths)
    dense = [torch.stack([torch.cat([x, x.new_zeros(n - x.shape[0], hq, d)]) for x in s]).transpose(1, 2) for s in seqs]
    keep = torch.tensor([[j < m for j in range(n)] for m in lengths])[:, None, None, :]
    ref = attention(*dense, keep)
    for i, m in enumerate(lengths):
        torch.testing.assert_close(out.transpose(1, 2)[i], ref[i, :, :m].transpose(0, 1))


def test_dropout_per_sequence_and_regenerated_in_backward():
    """q = k = 0 and v = identity expose each sequence's keep-mask; sequences get their own."""
    n, p = 64, 0.3
    lengths = [n, n]
    q = torch.zeros(2 * n, 1, 8, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64).unsqueeze(1).repeat(2, 1, 1)  # [2n, 1, n]
    cu = _offsets(lengths)
    seed = torch.tensor([11, 3])
    out, lse, rng = varlen_fwd(q, q, eye, cu, cu, n, n, seed, 0, 1.0, p)
    keep = out[:, 0, :] != 0  # [2n, n]: rows of sequence 0 then sequence 1
    assert abs(keep.double().mean().item() - (1 - p)) < 0.03
    assert not torch.equal(keep[:n], keep[n:])
    # Backward with random v and dout against the dense formula using the recovered mask.
    v = torch.randn(2 * n, 1, 8, dtype=torch.float64)
    dout = torch.randn(2 * n, 1, 8, dtype=torch.float64)
    out_v, lse_v, _ = varlen_fwd(q, q, v, cu, cu, n, n, seed, 0, 1.0, p)
    _, _, dv = varlen_bwd(dout, None, q, q, v, cu, cu, n, n, rng, out_v, lse_v, 0, 1.0, p)
    for i in range(2):
        rows = slice(i * n, (i + 1) * n)
        pd = keep[rows].double() / n / (1 - p)  # uniform probabilities, dropped and rescaled
        torch.testing.assert_close(out_v[rows, 0], pd @ v[rows, 0])
        torch.testing.assert_close(dv[rows, 0], pd.T @ dout[rows, 0])


BAD = {
    "offsets_not_from_zero": (dict(cu_q=torch.tensor([1, 4, 9], dtype=torch.int32)), r"cu_seqlens_q=\[1, 4, 9\] must start at 0"),
    "offsets_decreasing": (dict(cu_k=torch.tensor([0, 10, 9], dtype=torch.int32)), r"cu_seqlens_k=\[0, 10, 9\] must start at 0, never decrease"),
    "batch_mismatch": (dict(cu_k=torch.tensor([0, 6, 7, 9], dtype=torch.int32)), r"describe 2 and 3 sequences"),
    "offsets_wrong_end": (dict(cu_k=torch.tensor([0, 4, 8], dtype=torch.int32)), r"cu_seqlens_k=\[0, 4, 8\] must .* end at the packed length 9"),
    "offsets_float": (dict(cu_q=torch.tensor([0.0, 4.0, 9.0])), r"cu_seqlens_q must be a 1-D int32/int64 tensor"),
    "max_too_small": (dict(max_q=3), r"max_seqlen_q=3 is smaller than the longest sequence \(5\)"),
    "four_d_q": (dict(q=torch.randn(1, 9, 2, 8)), r"q must be a packed 3-D \[total_tokens, heads, head_dim\]"),
    "heads_not_multiple": (dict(q=torch.randn(9, 3, 8)), r"q has 3 heads and k/v have 2"),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_bad_varlen_input_names_the_argument(bad):
    changes, message = bad
    args = dict(q=torch.randn(9, 2, 8), k=torch.randn(9, 2, 8), v=torch.randn(9, 2, 8),
                cu_q=torch.tensor([0, 4, 9], dtype=torch.int32), cu_k=torch.tensor([0, 4, 9], dtype=torch.int32),
                max_q=5, max_k=5)
    args.update(changes)
    with pytest.raises(ValueError, match=message):
        attention_varlen(args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"], args["max_q"], args["max_k"])


def test_nested_input_errors():
    seqs = [torch.randn(n, 2, 8) for n in (3, 5)]
    q = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)
    with pytest.raises(ValueError, match="bias with nested q/k/v is not supported"):
        attention(q, q, q, torch.zeros(2, 1, 1, 5))
    with pytest.raises(ValueError, match="k and v must be nested"):
        attention(q, torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    with pytest.raises(ValueError, match="ragged dim"):
        qt = q.transpose(1, 2)  # [B, j, H, D]: the ragged dim in the wrong place
        attention(qt, qt, qt)


@pytest.mark.parametrize("forced,why", [("triton", "device=cpu"), ("aten_cpu", "variable-length .* is not in this kernel")])
def test_forced_kernel_that_refuses_varlen_raises(monkeypatch, forced, why):
    """A forced kernel never falls back: on CPU Triton refuses the device, aten_cpu varlen itself."""
    monkeypatch.setattr(flash_inductor.config, "kernel", forced)
    q = torch.randn(9, 2, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(dispatch.NoKernelError, match=f"FLASH_INDUCTOR_KERNEL={forced} was forced.*{why}"):
        attention_varlen(q, q, q, cu, cu, 5, 5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_varlen_matches_eager(backend):
    lq = [5, 11, 2]
    q, k, v = _packed(lq, lq, 2, 2, 16, 16, torch.float32)
    cu = _offsets(lq)

    def f(q, k, v, cu):
        return attention_varlen(q, k, v, cu, cu, 11, 11, causal=True).sin()

    torch._dynamo.reset()
    got = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, cu)
    want = f(q, k, v, cu)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_opcheck():
    lq = [3, 0, 5]
    q, k, v = _packed(lq, [2, 4, 5], 4, 2, 8, 8, torch.float32)
    cu_q, cu_k = _offsets(lq), _offsets([2, 4, 5])
    args = (q, k, v, cu_q, cu_k, 5, 5, None, 2, 0.3, 0.0, 0.0)
    torch.library.opcheck(varlen_fwd, args)
    out, lse, rng = varlen_fwd(*args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), cu_q, cu_k, 5, 5,
                rng, out.detach(), lse.detach(), 2, 0.3, 0.0, 0.0)
    torch.library.opcheck(varlen_bwd, bwd_args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_nested_matches_eager_and_checks_v_offsets(backend):
    seqs = [[torch.randn(n, 2, 8) for n in (3, 5, 2)] for _ in range(3)]
    q, k, v = (torch.nested.nested_tensor(s, layout=torch.jagged).transpose(1, 2).requires_grad_() for s in seqs)

    def f(q, k, v):
        return attention(q, k, v, causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    got, want = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(got.values(), want.values())
    (g1,) = torch.autograd.grad(got.values().pow(2).sum(), q)
    (g2,) = torch.autograd.grad(want.values().pow(2).sum(), q)
    torch.testing.assert_close(g1.values(), g2.values())
    # v with other sequence lengths (same total): refused when the op runs, not silently mixed.
    bad_v = torch.nested.nested_tensor([torch.randn(n, 2, 8) for n in (4, 4, 2)], layout=torch.jagged).transpose(1, 2)
    with pytest.raises(Exception, match="k and v must have the same sequence lengths"):
        compiled(q, k, bad_v)


def test_offsets_are_read_on_the_host_once_per_tensor_and_version(monkeypatch):
    """The offsets check reads them on the host (a sync that stops the host queueing ahead): a
    model's layers share one batch's offsets, so one read serves them all until they change."""
    from flash_inductor import varlen

    reads = []
    real = varlen._lengths
    monkeypatch.setattr(varlen, "_lengths", lambda *a: reads.append(a[1]) or real(*a))
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    for _ in range(3):
        attention_varlen(q, q, q, cu, cu, 6, 6)
    assert reads == ["cu_seqlens_q"]  # the same tensor, total and bound serve k too
    cu.add_(0)  # any in-place change is checked again
    attention_varlen(q, q, q, cu, cu, 6, 6)
    assert len(reads) == 2
    with pytest.raises(ValueError, match=r"max_seqlen_q=5 is smaller than the longest sequence \(6\)"):
        attention_varlen(q, q, q, cu, cu, 5, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens_k=\[0, 4, 9\] must start at 0"):
        attention_varlen(q, q, q, cu, torch.tensor([0, 4, 9], dtype=torch.int32), 6, 6)
