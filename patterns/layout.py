"""Views between the 3-D [B·H, N, ·] layout of bmm/baddbmm and the 4-D [B, H, N, ·] layout.

BLOOM computes its scores with `alibi.baddbmm(q, kᵀ)` in 3-D, views them as
[B, H, Nq, Nk] to add the causal mask, and views the probabilities back to 3-D for
`torch.bmm(probs, v)`. The rewrite follows such views when they only split or merge the
leading batch·heads dim and keep the last two (Nq, Nk) dims untouched.
"""

from __future__ import annotations

from flash_inductor.rewrite.fx import Call, example

from .steps import Refusal, SplitHeads


def split_heads(call: Call) -> SplitHeads | None:
    """SplitHeads when `call` views 3-D scores [B·H, Nq, Nk] as [B, H, Nq, Nk]."""
    if call.op != "reshape":
        return None
    src, dst = example(call["x"]), example(call.node)
    if src is None or dst is None or src.dim() != 3 or dst.dim() != 4:
        return None
    shape = call["shape"]
    if tuple(dst.shape[2:]) != tuple(src.shape[1:]) or len(shape) != 4:
        return None
    batch, heads = shape[0], shape[1]
    if isinstance(batch, int) and batch < 0 and isinstance(heads, int) and heads < 0:
        raise Refusal("layout_view", "the view that splits batch·heads infers both leading sizes (-1, -1)")
    return SplitHeads(batch, heads)  # one -1 is fine: unflatten infers it the same way


def merges_heads(call: Call) -> bool:
    """Whether `call` views 4-D probabilities [B, H, Nq, Nk] as [B·H, Nq, Nk]."""
    if call.op != "reshape":
        return False
    src, dst = example(call["x"]), example(call.node)
    return (src is not None and dst is not None and src.dim() == 4 and dst.dim() == 3
            and tuple(dst.shape[1:]) == tuple(src.shape[2:]))
