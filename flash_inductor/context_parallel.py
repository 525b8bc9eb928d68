"""Context-parallel (ring) attention: one sequence sharded across the ranks of a process group.

Each rank holds a shard of q, k and v along the sequence. K/V blocks travel around the ring
(torch.distributed point-to-point, any backend: gloo on CPU, NCCL on GPUs); every rank attends
its queries to each block with the op (`flash::fwd`) and merges the partial results through the
op's lse:  lse = logaddexp(lse_a, lse_b),  out = out_a·e^(lse_a − lse) + out_b·e^(lse_b − lse).
The backward runs the ring again: each block's dK/dV accumulate as it travels and go home at the
end; dQ stays local. Every exchange is posted before the step's kernels and waited for after
them, so the transfers overlap the attention work. It calls `flash::bwd` per block with the merged out and lse, which is exact
(FlashAttention's backward needs only the final O and lse of each row).

Causal load balancing ("zigzag"): the sequence is cut into 2·W chunks and rank r holds chunks r
and 2W−1−r, so every rank has the same amount of unmasked work. Use `zigzag_shard` /
`zigzag_unshard` to lay a full sequence out that way and back; without causal, a rank holds one
contiguous shard and `shard`/`unshard` do the same.

Scope today: no bias and no dropout (each would have to be sharded the same way and travel with
the blocks); a ValueError says so. PyTorch's own context-parallel API (torch.distributed.tensor
.experimental.context_parallel) dispatches SDPA to its own kernels and takes no custom op, hence
this module on plain torch.distributed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .inputs import Causal, accumulation_dtype, validate


def _chunks(rank: int, world: int, causal: bool) -> list[int]:
    """The global chunk indices a rank's local shard holds, in order."""
    return [rank, 2 * world - 1 - rank] if causal else [rank]


def zigzag_shard(x: Tensor, rank: int, world: int, dim: int = 2) -> Tensor:
    """Rank `rank`'s causal-balanced shard of a full sequence (chunks r and 2W−1−r)."""
    parts = x.chunk(2 * world, dim=dim)
    return torch.cat([parts[i] for i in _chunks(rank, world, True)], dim=dim)


def zigzag_unshard(shards: list[Tensor], dim: int = 2) -> Tensor:
    """The full sequence from every rank's zigzag shard (shards[r] from rank r)."""
    world = len(shards)
    parts: list[Optional[Tensor]] = [None] * (2 * world)
    for r, s in enumerate(shards):
        a, b = s.chunk(2, dim=dim)
        parts[r], parts[2 * world - 1 - r] = a, b
    return torch.cat(parts, dim=dim)


def _calls(rank: int, src: int, world: int, causal: bool, n: int):
    """The op calls that attend this rank's queries to the K/V block from rank `src`:
    (q slice, k slice, causal flag) over the local shards of length n.

    With zigzag sharding (chunks r and 2W−1−r here, s and 2W−1−s in the block) the unmasked chunk
    pairs always form one rectangle, or two on the diagonal block, so a block costs one or two
    large calls instead of up to four small ones.
    """
    everything = slice(None)
    if not causal:
        return [(everything, everything, Causal.NONE)]
    first, second = slice(0, n // 2), slice(n // 2, n)
    if src == rank:
        # Chunk r sees itself causally; chunk 2W−1−r sees all of chunk r and itself causally,
        # which is one bottom-right-aligned call over the whole block.
        return [(first, first, Causal.TOP_LEFT), (second, everything, Causal.BOTTOM_RIGHT)]
    if src < rank:  # chunk s precedes both query chunks; chunk 2W−1−s follows both
        return [(everything, first, Causal.NONE)]
    return [(second, everything, Causal.NONE)]  # only chunk 2W−1−r comes after both key chunks


def _post_exchange(tensors: list[Tensor], group):
    """Start sending `tensors` to the next rank and receiving the previous rank's (same shapes).

    Returns what `_finish_exchange` needs; the transfer runs while the caller computes (NCCL
    runs point-to-point on its own stream, gloo on its own thread)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    sent = [t.contiguous() for t in tensors]
    received = [torch.empty_like(t) for t in sent]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in sent]
    ops += [dist.P2POp(dist.irecv, r, prv, group) for r in received]
    return received, dist.batch_isend_irecv(ops), sent


def _finish_exchange(pending) -> list[Tensor]:
    received, requests, _sent = pending  # `_sent` keeps the send buffers alive until here
    for req in requests:
        req.wait()
    return received


def _merge_(out: Tensor, lse: Tensor, o_p: Tensor, l_p: Tensor) -> None:
    """Fold one call's (out, lse) into the running ones, in place; rows with no key yet
    (lse = −inf) take weight 0 on that side."""
    new = torch.logaddexp(lse, l_p)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(o_p * torch.exp(l_p - safe).unsqueeze(-1))
    lse.copy_(new)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, scale: float):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = accumulation_dtype(q.dtype)
        out = torch.empty(*q.shape[:3], v.shape[3], dtype=acc, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
        kv, src = [k.contiguous(), v.contiguous()], rank
        for step in range(world):
            pending = _post_exchange(kv, group) if step < world - 1 else None
            for qs, ks, flag in _calls(rank, src, world, causal, q.shape[2]):
                o_p, l_p, _ = torch.ops.flash.fwd(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], None, None,
                                                  int(flag), scale, 0.0)
                if step == 0:  # the local block's calls cover every query row exactly once
                    out[:, :, qs], lse[:, :, qs] = o_p, l_p
                else:
                    _merge_(out[:, :, qs], lse[:, :, qs], o_p, l_p)
            if pending is not None:
                kv, src = _finish_exchange(pending), (src - 1) % world
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale = group, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, scale = ctx.group, ctx.causal, ctx.scale
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        dout = dout.contiguous()
        rng = torch.empty(0, dtype=torch.int64, device=q.device)
        acc = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv, src = [k.contiguous(), v.contiguous()], rank
        # Each block's dK/dV accumulators travel one hop behind its K/V: the K/V for the next
        # step are in flight during this step's kernels, and the accumulators arriving from
        # behind are waited for only when this step's partial gradients are ready to add.
        dkdv = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
        pending_dkdv = None
        for step in range(world):
            pending_kv = _post_exchange(kv, group) if step < world - 1 else None
            partials = []
            for qs, ks, flag in _calls(rank, src, world, causal, q.shape[2]):
                dq_p, dk_p, dv_p, _ = torch.ops.flash.bwd(
                    dout[:, :, qs].contiguous(), None, q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], None, rng,
                    out[:, :, qs].contiguous(), lse[:, :, qs].contiguous(), int(flag), scale, 0.0, False,
                )
                dq[:, :, qs] += dq_p
                partials.append((ks, dk_p, dv_p))
            if pending_dkdv is not None:
                dkdv = _finish_exchange(pending_dkdv)
            for ks, dk_p, dv_p in partials:
                dkdv[0][:, :, ks] += dk_p
                dkdv[1][:, :, ks] += dv_p
            if world > 1:  # after the last step this sends the next rank its own block's gradients
                pending_dkdv = _post_exchange(dkdv, group)
            if pending_kv is not None:
                kv, src = _finish_exchange(pending_kv), (src - 1) % world
        dk, dv = _finish_exchange(pending_dkdv) if world > 1 else dkdv
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, *, group: Optional[dist.ProcessGroup] = None,
    causal: bool = False, scale: Optional[float] = None, bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention of this rank's query shard over the whole sharded sequence.

    Args:
        q, k, v: this rank's shards, [B, Hq, n, D] and [B, Hkv, n, D|Dv]; every rank's n equal.
            With causal=True they must be laid out by `zigzag_shard` (n even); without, one
            contiguous shard per rank in rank order.
        group: the process group the sequence is sharded over (default: the world).
        causal: top-left causal over the global sequence.
        scale: as in `attention`.

    Returns:
        This rank's shard of the output, [B, Hq, n, Dv], differentiable in q, k and v.
    """
    if bias is not None or dropout_p:
        raise ValueError("ring_attention does not take a bias or dropout yet (each would have to be "
                         "sharded like the keys and travel with them); use flash_inductor.attention per rank")
    if not dist.is_initialized():
        raise ValueError("ring_attention needs an initialised torch.distributed process group")
    inp = validate(q, k, v, None, scale=scale)
    if causal and q.shape[2] % 2:
        raise ValueError(f"with causal=True each shard holds two zigzag chunks: its length ({q.shape[2]}) must be even")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k shards must have the same length, got {q.shape[2]} and {k.shape[2]}")
    return _RingAttention.apply(q, k, v, group, bool(causal), inp.scale)
