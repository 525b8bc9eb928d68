"""The PyTorch reference: what runs on CPU, and what every faster kernel is tested against.

Keys are processed in chunks of `KEY_CHUNK` with an online softmax, so extra memory is
O(B·H·Nq·KEY_CHUNK) instead of O(B·H·Nq·Nk). Arithmetic runs in float32, or float64 for float64
inputs (the tests' ground truth). GQA reads each KV head once for its group of query heads.

Fully masked rows (every key removed by the keep-mask, the causal flag or -inf bias entries)
return zeros and lse = -inf, as SDPA's boolean masks and FlexAttention do.

Dropout draws its keep-mask from a generator seeded by (seed, key chunk), so the backward
regenerates exactly the forward's mask without storing it.
"""

from __future__ import annotations

import torch

from .inputs import MASKED_BIAS, AttentionInputs, Causal, accumulation_dtype

KEY_CHUNK = 1024


def _grouped(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, G, ...] so that query head h lands in KV group h // G."""
    b, h = x.shape[:2]
    return x.reshape(b, heads_kv, h // heads_kv, *x.shape[2:])


def _bias_chunk(inp: AttentionInputs, start: int, stop: int) -> torch.Tensor | None:
    """The bias columns [start, stop) as a 5-D [B|1, Hkv|1, G|1, Nq|1, n] view."""
    b = inp.bias_4d()
    if b is None:
        return None
    b = b[..., start:stop] if b.shape[-1] != 1 else b
    if b.shape[1] == 1:
        return b.unsqueeze(2)
    return _grouped(b, inp.heads_kv)


def _causal_keep(inp: AttentionInputs, start: int, stop: int, device) -> torch.Tensor | None:
    if inp.causal == Causal.NONE:
        return None
    rows = torch.arange(inp.len_q, device=device)[:, None]
    cols = torch.arange(start, stop, device=device)[None, :]
    shift = inp.len_k - inp.len_q if inp.causal == Causal.BOTTOM_RIGHT else 0
    return cols <= rows + shift


def dropout_keep_mask(
    seed: torch.Tensor, chunk_index: int, shape, p: float, device
) -> torch.Tensor:
    """Bernoulli(1-p) keep-mask for one key chunk, a pure function of (seed, chunk_index)."""
    s0, s1 = (int(x) for x in seed.tolist())
    gen = torch.Generator(device=device)
    gen.manual_seed((s0 * 1_000_003 + s1 * 8191 + chunk_index) % (2**63 - 1))
    return torch.rand(shape, generator=gen, device=device) >= p


def _scores(inp: AttentionInputs, q5, k_c, start, stop, acc, want_cap_grad: bool = False):
    """Scaled, soft-capped, biased, masked scores for keys [start, stop): [B, Hkv, G, Nq, n].

    With want_cap_grad, returns (scores, d(capped)/d(scaled)) = (s, 1 - tanh²) (None without
    soft-capping), which the backward needs to carry dS back through the cap.
    """
    s = torch.matmul(q5, k_c.to(acc).unsqueeze(2).transpose(-1, -2)) * inp.scale
    cap_grad = None
    if inp.softcap:
        t = torch.tanh(s / inp.softcap)
        s = inp.softcap * t
        cap_grad = 1 - t * t if want_cap_grad else None
    bias = _bias_chunk(inp, start, stop)
    keep = None
    if bias is not None:
        if bias.dtype == torch.bool:
            keep = bias
        else:
            s = s + bias.to(acc)
            keep = bias > MASKED_BIAS
    causal = _causal_keep(inp, start, stop, s.device)
    if causal is not None:
        keep = causal if keep is None else keep & causal
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return (s, cap_grad) if want_cap_grad else s


def forward(inp: AttentionInputs, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(inp.dtype)
    hkv = inp.heads_kv
    q5 = _grouped(inp.q, hkv).to(acc)
    shape = q5.shape[:-1]  # [B, Hkv, G, Nq]
    m = torch.full(shape, float("-inf"), dtype=acc, device=inp.device)
    l = torch.zeros(shape, dtype=acc, device=inp.device)
    o = torch.zeros(*shape, inp.head_dim_v, dtype=acc, device=inp.device)
    for ci, start in enumerate(range(0, inp.len_k, KEY_CHUNK)):
        stop = min(start + KEY_CHUNK, inp.len_k)
        s = _scores(inp, q5, inp.k[:, :, start:stop], start, stop, acc)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        if inp.dropout_p > 0.0:
            keep = dropout_keep_mask(seed, ci, _full_shape(inp, stop - start), inp.dropout_p, inp.device)
            p = p * _grouped(keep, hkv).to(acc) / (1.0 - inp.dropout_p)
        v_c = inp.v[:, :, start:stop].to(acc).unsqueeze(2)
        o = o * alpha.unsqueeze(-1) + torch.matmul(p, v_c)
        m = m_new
    empty = l == 0
    out = torch.where(empty.unsqueeze(-1), torch.zeros_like(o), o / torch.where(empty, 1, l).unsqueeze(-1))
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    lse = torch.where(empty, float("-inf"), m_safe + torch.log(torch.where(empty, 1, l)))
    b, hq, nq = inp.batch, inp.heads_q, inp.len_q
    return (
        out.reshape(b, hq, nq, inp.head_dim_v).to(inp.dtype),
        lse.reshape(b, hq, nq).to(torch.float32 if acc == torch.float32 else acc),
    )


def _full_shape(inp: AttentionInputs, n: int):
    return (inp.batch, inp.heads_q, inp.len_q, n)


def backward(
    inp: AttentionInputs,
    seed: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    bias_requires_grad: bool,
):
    """Gradients (dq, dk, dv, dbias or None) by recomputing each key chunk's probabilities.

    With s = scale·q·kᵀ + bias and P = softmax(s): dS = P ∘ (dP − rowsum(dO ∘ O) + dlse),
    where dP = dO·vᵀ (times the dropout keep-mask / (1-p)); dbias is dS summed over the dims
    the bias was broadcast along.
    """
    acc = accumulation_dtype(inp.dtype)
    hkv = inp.heads_kv
    q5 = _grouped(inp.q, hkv).to(acc)
    do5 = _grouped(dout, hkv).to(acc)
    lse5 = _grouped(lse, hkv).to(acc)
    delta = (do5 * _grouped(out, hkv).to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - _grouped(dlse, hkv).to(acc)
    lse_safe = torch.where(torch.isinf(lse5), torch.full_like(lse5, float("inf")), lse5)
    dq = torch.zeros_like(q5)
    dk = torch.zeros(inp.k.shape, dtype=acc, device=inp.device)
    dv = torch.zeros(inp.v.shape, dtype=acc, device=inp.device)
    dbias = None
    bias4 = inp.bias_4d()
    if bias_requires_grad:
        dbias = torch.zeros(bias4.shape, dtype=acc, device=inp.device)
    reduce_dims = inp.bias_broadcast_dims() if bias_requires_grad else ()
    for ci, start in enumerate(range(0, inp.len_k, KEY_CHUNK)):
        stop = min(start + KEY_CHUNK, inp.len_k)
        k_c = inp.k[:, :, start:stop].to(acc).unsqueeze(2)
        v_c = inp.v[:, :, start:stop].to(acc).unsqueeze(2)
        s, cap_grad = _scores(inp, q5, inp.k[:, :, start:stop], start, stop, acc, want_cap_grad=True)
        # lse = -inf marks a row with no visible key: its probabilities are 0, not NaN.
        p = torch.exp(s - lse_safe.unsqueeze(-1))
        dp = torch.matmul(do5, v_c.transpose(-1, -2))
        if inp.dropout_p > 0.0:
            keep = _grouped(
                dropout_keep_mask(seed, ci, _full_shape(inp, stop - start), inp.dropout_p, inp.device),
                hkv,
            ).to(acc) / (1.0 - inp.dropout_p)
            p_drop = p * keep
            dp = dp * keep
        else:
            p_drop = p
        dv[:, :, start:stop] += torch.matmul(p_drop.transpose(-1, -2), do5).sum(2)
        ds = p * (dp - delta.unsqueeze(-1))
        # The bias is added after the cap: it takes dS as is; q·kᵀ takes it through the cap.
        ds_qk = ds if cap_grad is None else ds * cap_grad
        dq += torch.matmul(ds_qk, k_c) * inp.scale
        dk[:, :, start:stop] += torch.matmul(ds_qk.transpose(-1, -2), q5).sum(2) * inp.scale
        if dbias is not None:
            ds4 = ds.reshape(inp.batch, inp.heads_q, inp.len_q, stop - start)
            if reduce_dims:
                ds4 = ds4.sum(dim=reduce_dims, keepdim=True)
            if bias4.shape[-1] == 1:
                dbias += ds4.sum(-1, keepdim=True)
            else:
                dbias[..., start:stop] += ds4
    dq = dq.reshape(inp.q.shape).to(inp.dtype)
    if dbias is not None:
        dbias = dbias.reshape(inp.bias.shape).to(inp.bias.dtype)
    return dq, dk.to(inp.dtype), dv.to(inp.dtype), dbias


def attention_ref(
    q, k, v, bias=None, *, causal=False, scale=None, dropout_p=0.0, seed=None, softcap=None
) -> torch.Tensor:
    """Plain (non-tiled) attention in the inputs' dtype or float64: the tests' ground truth.

    Materialises the full score matrix, so use it on small shapes. Autograd flows through it,
    which is how the tests get reference gradients, bias gradients included.
    """
    from .inputs import validate

    inp = validate(q, k, v, bias, causal=causal, scale=scale, dropout_p=dropout_p, softcap=softcap)
    g = inp.heads_q // inp.heads_kv
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    s = torch.matmul(q, kk.transpose(-1, -2)) * inp.scale
    if inp.softcap:
        s = inp.softcap * torch.tanh(s / inp.softcap)
    keep = None
    if bias is not None:
        if bias.dtype == torch.bool:
            keep = bias
        else:
            s = s + bias.to(s.dtype)
            keep = bias > MASKED_BIAS
    c = _causal_keep(inp, 0, inp.len_k, q.device)
    if c is not None:
        keep = c if keep is None else keep & c
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0.0:
        # The same per-chunk masks as the tiled reference, so both agree on any Nk.
        keep_d = torch.cat(
            [
                dropout_keep_mask(seed, ci, _full_shape(inp, min(KEY_CHUNK, inp.len_k - start)), dropout_p, q.device)
                for ci, start in enumerate(range(0, inp.len_k, KEY_CHUNK))
            ],
            dim=-1,
        )
        p = p * keep_d / (1.0 - dropout_p)
    return torch.matmul(p, vv)
