"""Context-parallel (ring) attention: one sequence sharded across the ranks of a process group.

Each rank holds a shard of q, k and v along the sequence. K/V blocks travel around the ring
(torch.distributed point-to-point, any backend: gloo on CPU, NCCL on GPUs); every rank attends
its queries to each block with the op (`flash::fwd`) and merges the partial results through the
op's lse:  lse = logaddexp(lse_a, lse_b),  out = out_a·e^(lse_a − lse) + out_b·e^(lse_b − lse).
The backward runs the ring again: each block's dK/dV accumulate as it travels and go home at the
end; dQ stays local. It calls `flash::bwd` per block with the merged out and lse, which is exact
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


def _pairs(rank: int, src: int, world: int, causal: bool, n_local: int, n_local_k: int):
    """(q slice, k slice, causal flag) for each block pair that is not fully masked."""
    q_chunks, k_chunks = _chunks(rank, world, causal), _chunks(src, world, causal)
    cq, ck = n_local // len(q_chunks), n_local_k // len(k_chunks)
    for i, qc in enumerate(q_chunks):
        for j, kc in enumerate(k_chunks):
            if causal and kc > qc:
                continue  # every key of this chunk is after every query: fully masked, skipped
            flag = Causal.TOP_LEFT if causal and kc == qc else Causal.NONE
            yield slice(i * cq, (i + 1) * cq), slice(j * ck, (j + 1) * ck), int(flag)


def _ring_exchange(tensors: list[Tensor], group) -> list[Tensor]:
    """Send `tensors` to the next rank, receive the previous rank's (same shapes)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv, group) for r in received]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


def _merge(out, lse, o_p, l_p):
    """Fold one block's (out, lse) into the running ones, rows with no key yet included."""
    new = torch.logaddexp(lse, l_p)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    wa = torch.where(torch.isneginf(lse), torch.zeros_like(lse), torch.exp(lse - safe))
    wb = torch.where(torch.isneginf(l_p), torch.zeros_like(l_p), torch.exp(l_p - safe))
    return out * wa.unsqueeze(-1) + o_p * wb.unsqueeze(-1), new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, scale: float):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = accumulation_dtype(q.dtype)
        out = torch.zeros(*q.shape[:3], v.shape[3], dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        kv, src = (k.contiguous(), v.contiguous()), rank
        for step in range(world):
            for qs, ks, flag in _pairs(rank, src, world, causal, q.shape[2], kv[0].shape[2]):
                o_p, l_p, _ = torch.ops.flash.fwd(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], None, None, flag,
                                                  scale, 0.0)
                out[:, :, qs], lse[:, :, qs] = _merge(out[:, :, qs], lse[:, :, qs], o_p.to(acc), l_p.to(acc))
            if step < world - 1:
                kv, src = tuple(_ring_exchange(list(kv), group)), (src - 1) % world
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
        blocks = [k.contiguous(), v.contiguous(), torch.zeros(k.shape, dtype=acc, device=k.device),
                  torch.zeros(v.shape, dtype=acc, device=v.device)]
        src = rank
        for step in range(world):
            kb, vb, dk_acc, dv_acc = blocks
            for qs, ks, flag in _pairs(rank, src, world, causal, q.shape[2], kb.shape[2]):
                dq_p, dk_p, dv_p, _ = torch.ops.flash.bwd(
                    dout[:, :, qs].contiguous(), None, q[:, :, qs], kb[:, :, ks], vb[:, :, ks], None, rng,
                    out[:, :, qs].contiguous(), lse[:, :, qs].contiguous(), flag, scale, 0.0, False,
                )
                dq[:, :, qs] += dq_p.to(acc)
                dk_acc[:, :, ks] += dk_p.to(acc)
                dv_acc[:, :, ks] += dv_p.to(acc)
            if step < world - 1:
                blocks, src = _ring_exchange(blocks, group), (src - 1) % world
        # The block here now is the next rank's own: its dK/dV go home; ours arrive from behind.
        dk, dv = _ring_exchange([blocks[2], blocks[3]], group) if world > 1 else (blocks[2], blocks[3])
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
