"""Views between the 3-D [B·H, N, ·] layout of bmm/baddbmm and the 4-D [B, H, N, ·] layout.

BLOOM computes its scores with `alibi.baddbmm(q, kᵀ)` in 3-D, views them as
[B, H, Nq, Nk] to add the causal mask, and views the probabilities back to 3-D for
`torch.bmm(probs, v)`. The rewrite follows such views when they only split or merge the
leading batch·heads dim and keep the last two (Nq, Nk) dims untouched.

Swin V2's shifted windows view 4-D scores [B·W, H, Nq, Nk] as 5-D [B, W, H, Nq, Nk], add the
window mask [1, W, 1, Nq, Nk] and view them back: a round trip over the batch dim alone, which
the rewrite follows too (the bias is laid out in 4-D for the op).
"""

from __future__ import annotations

from flash_inductor.rewrite.fx import Call, example

from .steps import MergeBatch, MergeHeads, Refusal, SplitBatch, SplitHeads


def _shapes(call: Call, src_dim: int, dst_dim: int):
    """(input shape, output shape) when `call` is a view from src_dim to dst_dim dims, else None."""
    if call.op != "reshape":
        return None
    src, dst = example(call["x"]), example(call.node)
    if src is None or dst is None or src.dim() != src_dim or dst.dim() != dst_dim:
        return None
    return tuple(src.shape), tuple(dst.shape)


def split_heads(call: Call) -> SplitHeads | None:
    """SplitHeads when `call` views 3-D scores [B·H, Nq, Nk] as [B, H, Nq, Nk]."""
    shapes = _shapes(call, 3, 4)
    if shapes is None or shapes[1][2:] != shapes[0][1:] or len(call["shape"]) != 4:
        return None
    batch, heads = call["shape"][0], call["shape"][1]
    if isinstance(batch, int) and batch < 0 and isinstance(heads, int) and heads < 0:
        raise Refusal("layout_view", "the view that splits batch·heads infers both leading sizes (-1, -1)")
    return SplitHeads(batch, heads)  # one -1 is fine: unflatten infers it the same way


def merges_heads(call: Call) -> bool:
    """Whether `call` views 4-D probabilities [B, H, Nq, Nk] as [B·H, Nq, Nk]."""
    shapes = _shapes(call, 4, 3)
    return shapes is not None and shapes[1][1:] == shapes[0][2:]


def split_batch(call: Call) -> SplitBatch | None:
    """SplitBatch when `call` views 4-D scores [A·W, H, Nq, Nk] as 5-D [A, W, H, Nq, Nk]."""
    shapes = _shapes(call, 4, 5)
    if shapes is None or shapes[1][2:] != shapes[0][1:] or shapes[1][0] * shapes[1][1] != shapes[0][0]:
        return None
    return SplitBatch(shapes[1][0], shapes[1][1])


def merges_batch(call: Call) -> bool:
    """Whether `call` views 5-D scores [A, W, H, Nq, Nk] back as 4-D [A·W, H, Nq, Nk]."""
    shapes = _shapes(call, 5, 4)
    return shapes is not None and shapes[1][1:] == shapes[0][2:] and shapes[1][0] == shapes[0][0] * shapes[0][1]


def view_step(call: Call):
    """(the step, its spelling) when `call` is one of the views above; else None."""
    if merges_heads(call):
        return MergeHeads(), "view(heads)"
    if merges_batch(call):
        return MergeBatch(), "view(batch)"
    split = split_heads(call)
    if split is not None:
        return split, "view(heads)"
    split = split_batch(call)
    return (split, "view(windows)") if split is not None else None
