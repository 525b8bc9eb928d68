"""Variable-length batches: packed sequences (cumulative offsets) and jagged nested tensors.

Two entries, one op:

* `attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)`:
  FlashAttention's `flash_attn_varlen_func` convention. q is [total_q, Hq, D], k/v
  [total_k, Hkv, D|Dv]; sequence i owns rows cu_seqlens[i]:cu_seqlens[i+1] of each; out is
  [total_q, Hq, Dv]. Attention never crosses sequences; causal applies within each.
* `flash_inductor.attention(q, k, v)` with jagged nested tensors (`layout=torch.jagged`) in
  SDPA's convention, [B, H, j, D] (built [B, j, H, D], then transposed): their packed values
  and offsets go through the same op, and the output comes back as a nested tensor.

The op is `flash::varlen_fwd` / `flash::varlen_bwd` (custom ops with fakes and autograd, like
`flash::fwd`). lse is [total_q, Hq], float32 (float64 for float64 input). A sequence with no keys returns zeros and
lse = -inf, as a fully masked row does. Dropout draws each sequence's mask from the call's seed
and the sequence index, so two sequences never share a mask.

Kernels: backends that declare `SUPPORTS_VARLEN`, in dispatch order. The Triton kernels run
the packed batch in one launch per pass, one program per (query block of the longest sequence,
sequence · head); blocks past a sequence's end exit at once, so the work is proportional to the
real tokens and no padding is ever computed or read. The reference runs each sequence through
flash_inductor.reference (any device; it reads the offsets on the host). A backend's dropout
mask is its own (each regenerates its own in the backward, as for `flash::fwd`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from . import dispatch, reference
from .inputs import AttentionInputs, accumulation_dtype, validate


def _lengths(cu: Tensor, name: str, total: int) -> list[int]:
    """Offsets -> lengths, checked (a host read: the reference needs them there anyway)."""
    offs = _offsets(cu)
    if offs[0] != 0 or offs[-1] != total or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(
            f"{name}={offs} must start at 0, never decrease, and end at the packed length {total}"
        )
    return [b - a for a, b in zip(offs, offs[1:])]


def _check_max(lengths: list[int], max_len: int, name: str) -> None:
    if lengths and max(lengths) > max_len:
        raise ValueError(f"{name}={max_len} is smaller than the longest sequence ({max(lengths)})")


# Offsets tensors already checked, with what they were checked against: the check reads them on
# the host, a sync that stops the host from queueing ahead, and the layers of a model share one
# batch's offsets. Keyed by the tensor itself (gone with it) and its version counter (an in-place
# change is checked again).
_CHECKED = WeakTensorKeyDictionary()


def _check_offsets(cu: Tensor, name: str, total: int, max_len: int, max_name: str) -> None:
    """`_lengths` and `_check_max`, once per offsets tensor and version."""
    try:
        facts = (cu._version, total, max_len)
    except RuntimeError:  # an inference tensor has no version counter: check it every time
        facts = None
    if facts is not None and _CHECKED.get(cu) == facts:
        return
    _check_max(_lengths(cu, name, total), max_len, max_name)
    if facts is not None:
        _CHECKED[cu] = facts


def _sequence_inputs(q, k, v, oq, ok, causal, scale, dropout_p, softcap) -> AttentionInputs:
    """Sequence slices as [1, H, n, D] views (no copy) for the dense reference."""
    qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (q[oq[0]:oq[1]], k[ok[0]:ok[1]], v[ok[0]:ok[1]]))
    return AttentionInputs.from_op(qi, ki, vi, None, causal, scale, dropout_p, softcap)


def _sequence_seed(rng: Optional[Tensor], i: int) -> Optional[Tensor]:
    if rng is None:
        return None
    return rng + torch.tensor([0, i + 1], dtype=rng.dtype, device=rng.device)


def _offsets(cu: Tensor) -> list[int]:
    return [int(x) for x in cu.tolist()]


def _reference_forward(q, k, v, cu_q, cu_k, causal, scale, dropout_p, softcap, rng):
    oq, ok = _offsets(cu_q), _offsets(cu_k)
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    for i in range(len(oq) - 1):
        if oq[i + 1] == oq[i]:
            continue
        inp = _sequence_inputs(q, k, v, oq[i:i + 2], ok[i:i + 2], causal, scale, dropout_p, softcap)
        o, l = reference.forward(inp, _sequence_seed(rng, i))
        out[oq[i]:oq[i + 1]] = o[0].transpose(0, 1)
        lse[oq[i]:oq[i + 1]] = l[0].transpose(0, 1)
    return out, lse


def _reference_backward(dout, dlse, q, k, v, cu_q, cu_k, rng, out, lse, causal, scale, dropout_p, softcap):
    oq, ok = _offsets(cu_q), _offsets(cu_k)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i in range(len(oq) - 1):
        if oq[i + 1] == oq[i] or ok[i + 1] == ok[i]:
            continue  # no query rows, or no keys (zero output): nothing flows back
        inp = _sequence_inputs(q, k, v, oq[i:i + 2], ok[i:i + 2], causal, scale, dropout_p, softcap)
        rows = slice(oq[i], oq[i + 1])
        per_seq = (t[rows].transpose(0, 1).unsqueeze(0) for t in (out, lse, dout))
        o_i, l_i, do_i = per_seq
        dl_i = dlse[rows].transpose(0, 1).unsqueeze(0) if dlse is not None else None
        g = reference.backward(inp, _sequence_seed(rng, i), o_i, l_i, do_i, dl_i, False)
        dq[rows] = g[0][0].transpose(0, 1)
        dk[ok[i]:ok[i + 1]] = g[1][0].transpose(0, 1)
        dv[ok[i]:ok[i + 1]] = g[2][0].transpose(0, 1)
    return dq, dk, dv


def _as_dense_inputs(q, k, v, causal, scale, dropout_p, softcap) -> AttentionInputs:
    """A [1, H, total, D] view, only for dispatch's declarations (dtype, device, head dims)."""
    return AttentionInputs.from_op(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), None, causal,
                                   scale, dropout_p, softcap)


def _select(q, k, v, causal, scale, dropout_p, softcap, kernel=None):
    """The backend for varlen input: dispatch's own choice, among backends that declare varlen
    support (a forced one that does not raises, as for dense input); `kernel` as in `flash::bwd`."""
    return dispatch.select(_as_dense_inputs(q, k, v, causal, scale, dropout_p, softcap), varlen=True, kernel=kernel)


@torch.library.custom_op("flash::varlen_fwd", mutates_args=())
def varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, seed: Optional[Tensor], causal: int, scale: float,
    dropout_p: float, softcap: float = 0.0, cu_seqlens_v: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`cu_seqlens_v`, when given (nested input under torch.compile, where the offsets cannot be
    compared while tracing), must equal cu_seqlens_k; it is checked here, at run time."""
    backend = _select(q, k, v, causal, scale, dropout_p, softcap)
    if cu_seqlens_v is not None and not torch.equal(cu_seqlens_v.to(cu_seqlens_k.dtype), cu_seqlens_k):
        raise ValueError("k and v must have the same sequence lengths (offsets)")
    if dropout_p > 0.0:
        from .ops import _draw_seed

        rng = seed.to(device=q.device, dtype=torch.int64).clone() if seed is not None else _draw_seed(q.device)
    else:
        rng = torch.empty(0, dtype=torch.int64, device=q.device)
    _check_offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_offsets(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k")
    if backend.NAME == "reference":
        out, lse = _reference_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, dropout_p, softcap,
                                      rng if dropout_p > 0.0 else None)
    else:
        out, lse = backend.forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                          scale, dropout_p, rng if dropout_p > 0.0 else None, softcap)
    return out, lse, rng


@varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal, scale,
                     dropout_p, softcap=0.0, cu_seqlens_v=None):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    lse = q.new_empty((q.shape[0], q.shape[1]), dtype=accumulation_dtype(q.dtype))
    rng = q.new_empty((2,) if dropout_p > 0.0 else (0,), dtype=torch.int64)
    return out, lse, rng


@torch.library.custom_op("flash::varlen_bwd", mutates_args=())
def varlen_bwd(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, rng: Tensor, out: Tensor, lse: Tensor,
    causal: int, scale: float, dropout_p: float, softcap: float = 0.0, fwd_kernel: str = "",
) -> tuple[Tensor, Tensor, Tensor]:
    """`fwd_kernel`: the kernel the forward was forced to ("" if none), as in `flash::bwd`."""
    backend = _select(q, k, v, causal, scale, dropout_p, softcap, fwd_kernel or None)
    seed = rng if dropout_p > 0.0 else None
    if backend.NAME == "reference":
        return _reference_backward(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, seed, out, lse, causal, scale,
                                   dropout_p, softcap)
    dq, dk, dv = backend.backward_varlen(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         seed, out, lse, causal, scale, dropout_p, softcap)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng, out, lse,
                     causal, scale, dropout_p, softcap=0.0, fwd_kernel=""):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, _seed, causal, scale, dropout_p, softcap, _cu_v = inputs
    out, lse, rng = output
    ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse, rng)
    ctx.args = (max_q, max_k, causal, scale, dropout_p, softcap)
    ctx.kernel = dispatch.forced_kernel() or ""  # the backward must run the forward's kernel


def _backward(ctx, dout, dlse, _drng):
    q, k, v, cu_q, cu_k, out, lse, rng = ctx.saved_tensors
    max_q, max_k, causal, scale, dropout_p, softcap = ctx.args
    dq, dk, dv = varlen_bwd(dout.contiguous(), dlse, q, k, v, cu_q, cu_k, max_q, max_k, rng, out, lse,
                            causal, scale, dropout_p, softcap, *((ctx.kernel,) if ctx.kernel else ()))
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, dropout_p, softcap) -> AttentionInputs:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a packed 3-D [total_tokens, heads, head_dim] tensor, got {shape}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor of B+1 cumulative offsets")
        if cu.numel() < 2:
            raise ValueError(f"{name} must hold at least 2 offsets (one sequence), got {cu.numel()}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k describe {cu_seqlens_q.numel() - 1} and "
            f"{cu_seqlens_k.numel() - 1} sequences: they must describe the same batch"
        )
    # The dense contract (dtypes, heads, head dims, scale, dropout_p, softcap) on [1, H, total, D] views.
    return validate(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), None, causal=causal, scale=scale,
                    dropout_p=dropout_p, softcap=softcap)


def attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, *, causal: bool | str = False, scale: Optional[float] = None,
    dropout_p: float = 0.0, softcap: Optional[float] = None, _cu_seqlens_v: Optional[Tensor] = None,
) -> Tensor:
    """Attention over packed variable-length sequences (FlashAttention's varlen convention).

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D] and [total_k, Hkv, Dv] (GQA as in `attention`).
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B+1] cumulative offsets, starting at 0 and
            ending at total_q / total_k; sequence i is rows cu[i]:cu[i+1].
        max_seqlen_q, max_seqlen_k: at least the longest sequence (kernels size their grids by it).
        causal, scale, dropout_p, softcap: as in `attention`, applied within each sequence
            ('bottom_right' aligns each sequence's queries with the end of its own keys).

    Returns:
        out [total_q, Hq, Dv] in q's dtype.
    """
    inp = _validate_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, dropout_p, softcap)
    extra = (inp.softcap, _cu_seqlens_v) if _cu_seqlens_v is not None else ((inp.softcap,) if inp.softcap else ())
    return varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None,
                      int(inp.causal), inp.scale, inp.dropout_p, *extra)[0]


def _packed(t: Tensor, name: str):
    """A jagged [B, H, j, D] nested tensor -> (values [total, H, D], offsets, max_seqlen)."""
    if t.layout != torch.jagged:
        raise ValueError(f"{name} is a nested tensor with layout {t.layout}; only layout=torch.jagged is supported")
    if t.dim() != 4 or t._ragged_idx != 2:
        raise ValueError(
            f"{name} must be a jagged nested tensor [batch, heads, seq_len (ragged), head_dim], as SDPA "
            f"takes them (built [batch, seq_len, heads, head_dim], then .transpose(1, 2)); got {t.dim()}-D "
            f"with the ragged dim at {t._ragged_idx}"
        )
    seq_major = t.transpose(1, 2)  # [B, j, H, D]: values() is [total, H, D]
    max_len = seq_major._get_max_seqlen() if hasattr(seq_major, "_get_max_seqlen") else None
    if max_len is None:
        lengths = seq_major.offsets().diff()
        max_len = int(lengths.max()) if lengths.numel() else 0
    return seq_major.values(), seq_major.offsets(), max_len


def attention_nested(q, k, v, bias=None, *, causal=False, scale=None, dropout_p=0.0, softcap=None):
    """`attention` for jagged nested q, k, v ([B, H, j, D]); returns a nested [B, H, j, Dv]."""
    if not (k.is_nested and v.is_nested):
        raise ValueError("q is a nested tensor, so k and v must be nested (jagged) tensors too")
    if bias is not None:
        raise ValueError(
            "bias with nested q/k/v is not supported: a nested batch needs no padding mask; "
            "for causal masking pass causal=True"
        )
    qv, q_off, q_max = _packed(q, "q")
    kv, k_off, k_max = _packed(k, "k")
    vv, v_off, _ = _packed(v, "v")
    # One ragged structure (one nested int) needs no check; otherwise the op compares the
    # offsets when it runs (they cannot be read while torch.compile traces).
    cu_v = None if (v_off is k_off or k.shape[2] == v.shape[2]) else v_off
    if q_off.numel() != k_off.numel():
        raise ValueError(f"q has {q_off.numel() - 1} sequences and k has {k_off.numel() - 1}")
    out = attention_varlen(qv, kv, vv, q_off, k_off, q_max, k_max, causal=causal, scale=scale,
                           dropout_p=dropout_p, softcap=softcap, _cu_seqlens_v=cu_v)
    nested = torch.nested.nested_tensor_from_jagged(out, q_off, max_seqlen=q_max)
    return nested.transpose(1, 2)
