"""Views between an einsum's own dim order and the op's [B, H, N, D].

The op reads q, k and v through their strides, so an einsum operand in any order reaches it as a
permuted view, and a result in any order is a permuted view of the op's output. Extra shared
dims (LongT5: batch and blocks before the heads) merge into B. For q, k and v that must be a
view: a copy would be correct but would cost what the rewrite exists to save, so the site is
refused instead. A bias or mask (and the rows the empty-row patch reads) may be copied: it is
broadcast against scores that eager materialises anyway, and the copy is reported.
"""

from __future__ import annotations

import operator

from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

from ..patterns.einsum import EinsumLayout
from ..patterns.steps import Refusal
from .emit import Emitter
from .fx import example


def _is_identity(perm) -> bool:
    return tuple(perm) == tuple(range(len(perm)))


def _mergeable(t, end: int) -> bool:
    """Whether dims 0..end of `t` flatten to one dim as a view (size-1 dims have no say). Under
    dynamic shapes the answer is guarded, as torch's own view-or-copy choice in reshape is:
    LongT5's block stride is N // (N // block) · H · D, which equals block · H · D only because
    the block divides N, a fact the symbolic strides do not carry."""
    dims = [i for i in range(end + 1) if not statically_known_true(t.shape[i] == 1)]
    return all(guard_or_false(t.stride(a) == t.stride(b) * t.shape[b]) for a, b in zip(dims, dims[1:]))


def batch_sizes(emit: Emitter, node: Node, perm, n_batch: int) -> list:
    """The sizes of the dims that merge into the op's B, as graph values (ints, or `size` calls
    under dynamic shapes), to split the op's output back into them."""
    ev = example(node)
    sizes = []
    for d in perm[: n_batch - 1]:
        s = ev.shape[d]
        sizes.append(s if isinstance(s, int) else emit.call_method("size", node, d))
    return sizes


def operand(emit: Emitter, node: Node, perm, n_batch: int, name: str) -> Node:
    """q, k or v as the op's [B, H, N, D] (or [B·H, N, D] with one shared dim) view."""
    if not _is_identity(perm):
        node = emit.call_method("permute", node, *perm)
    if n_batch <= 2:
        return node
    ev = example(node)
    if not _mergeable(ev, n_batch - 2):
        raise Refusal("einsum_batch_view",
                      f"{name}'s {n_batch - 1} leading dims {tuple(ev.shape[:n_batch - 1])} (strides "
                      f"{tuple(ev.stride()[:n_batch - 1])}) do not merge into one batch dim without a copy; "
                      f"make {name} contiguous over them before the einsum")
    return emit.call_method("flatten", node, 0, n_batch - 2)


def score_tensor(emit: Emitter, t: Node | None, layout: EinsumLayout, sizes: list) -> tuple[Node | None, bool]:
    """A tensor that broadcasts against the einsum's scores (bias, keep-mask, a fully masked row's
    entries) laid out to broadcast against the op's [B, H, Nq, Nk]; and whether that copied it."""
    if t is None:
        return None, False
    ev = example(t)
    nd, n = len(layout.roles), layout.n_batch
    identity = _is_identity(layout.result_perm)
    if identity and (n <= 2 or ev.dim() <= 3):
        return t, False  # its dims already line up with the op's from the right
    if ev.dim() < nd:  # name every dim, so that the permutation and the merge know them all
        t = emit.call(operator.getitem, t, (None,) * (nd - ev.dim()) + (Ellipsis,))
    if not identity:
        t = emit.call_method("permute", t, *layout.result_perm)
    if n <= 2:
        return t, False
    lead = example(t).shape[: n - 1]
    full = [x.meta.get("example_value") if isinstance(x, Node) else x for x in sizes]
    if not all(statically_known_true(s == 1) for s in lead) and not all(
            statically_known_true(s == f) for s, f in zip(lead, full)):
        # Broadcast over some merged dims only ([B, 1, ...] against [B, blocks, ...]): no stride
        # makes that one dim, so it is expanded, and the flatten below copies it.
        t = emit.call_method("expand", t, *sizes, *([-1] * (nd - n + 1)))
    copied = not _mergeable(example(t), n - 2)
    return emit.call_method("flatten", t, 0, n - 2), copied


def result(emit: Emitter, out: Node, layout: EinsumLayout, sizes: list) -> Node:
    """The op's [B, H, Nq, Dv] output as the value einsum's result: B split back into the
    merged dims, then the einsum's own order (views)."""
    if layout.n_batch > 2:
        out = emit.call_method("unflatten", out, 0, tuple(sizes))
    if not _is_identity(layout.result_perm):
        out = emit.call_method("permute", out, *layout.result_perm)
    return out
