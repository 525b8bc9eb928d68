"""Rewrite one-node multi-head attention (`F.multi_head_attention_forward`) around flash::fwd.

Dynamo keeps the call as one node, so the softmax-anchored matcher never sees the attention of
WavLM or of an `nn.MultiheadAttention`. Here the node becomes what torch's function computes
(patterns/mha.py lists it): the in-projection, the head split, torch's masks merged
into one keep-mask or bias, flash::fwd through the matcher's `_emit_op` (kernel dispatch, fully
masked rows and refusals as for an SDPA call), the head merge and the out-projection. Autograd
then differentiates the projections as it does eager's.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..inputs import Causal
from ..patterns import mha as mha_family
from ..patterns.steps import Refusal
from .emit import Emitter
from .fx import example
from .matcher import _emit_op, site_name
from .report import SiteReport, record

# Operators that write into an operand: the weights read by one stay live whatever its result.
_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ipow, operator.iand, operator.ior, operator.ixor}


def rewrite_one_call_sites(gm: GraphModule, graph_name: str = "") -> list[SiteReport]:
    """Rewrite every one-node multi-head attention of the graph; report each like any site."""
    reports = []
    for node in list(gm.graph.nodes):
        if not mha_family.is_one_call_attention(node):
            continue
        try:
            rep = _rewrite(gm, node)
        except Refusal as r:
            rep = SiteReport(site_name(node), False, guard=r.guard, reason=r.reason)
        rep.graph = graph_name
        record(rep)
        reports.append(rep)
    return reports


def _rewrite(gm: GraphModule, node: Node) -> SiteReport:
    m = mha_family.match_mha(node)
    outputs, weights_readers = _outputs(node)
    spelling = ["mha", "in_proj(separate)" if len(m.in_proj) == 3 else "in_proj(packed)"]
    emit = Emitter(gm.graph, node)
    try:
        q, k, v = _project(emit, m)
        bias, causal, empty_rows, mask_spelling = _merged_mask(emit, m, example(m.query).dtype)
        spelling += mask_spelling + (["dropout"] if m.dropout_p else [])
        spelling += ["weights(unused)"] if weights_readers else []
        attn, kernel = _emit_op(emit, q, k, v, bias, causal, 1.0 / math.sqrt(m.head_dim), m.dropout_p,
                                example(q).dtype, empty_rows)
        out = _out_projection(emit, attn, m)
    except Refusal:
        emit.rollback()
        raise
    name = site_name(node)
    for o in outputs:
        o.replace_all_uses_with(out)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(outputs + weights_readers, key=order.get, reverse=True):
        gm.graph.erase_node(n)
    gm.graph.erase_node(node)
    _erase_unused_canonical_masks(gm, m.given_masks)
    return SiteReport(name, True, "·".join(spelling + ["out_proj"]), *kernel)


def _outputs(node: Node) -> tuple[list[Node], list[Node]]:
    """(the nodes reading the attention output, every node reading the weights, directly or not).

    need_weights=True with the weights used is refused: the op never forms the probabilities.
    WavLM asks for them and drops them (its layer returns `attn_weights[:, None].broadcast_to(...)`,
    which its caller discards): such readers are erased with the call."""
    outs, weights = [], []
    for u in node.users:
        if not (u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)):
            raise Refusal("mha_outputs", f"the call's result is read by {u.name} other than as (output, weights)")
        (outs if u.args[1] == 0 else weights).append(u)
    readers, frontier = [], list(weights)
    while frontier:
        n = frontier.pop()
        if n in readers:
            continue
        if _keeps_alive(n):
            what = "returned by the graph" if n.op == "output" else f"read by {n.name}"
            raise Refusal("mha_weights_used", f"need_weights=True and the attention weights are used ({what}); "
                                              "the fused op never forms them (need_weights=False is rewritten)")
        readers.append(n)
        frontier.extend(n.users)
    return outs, readers


def _keeps_alive(n: Node) -> bool:
    """The graph's output, a module call, or a call that may write somewhere (in place, out=)."""
    if n.op in ("output", "call_module") or n.is_impure() or "out" in n.kwargs:
        return True
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or n.target in _IN_PLACE_OPERATORS


def _project(emit: Emitter, m: mha_family.Mha) -> tuple[Node, Node, Node]:
    """q, k, v as [B, H, N, D] views of the in-projection."""
    with_batch = {}
    for x in (m.query, m.key, m.value):  # one node for query, key and value stays one (self-attention)
        if x not in with_batch:
            with_batch[x] = x if m.batched else emit.call_method("unsqueeze", x, 1)
    query, key, value = with_batch[m.query], with_batch[m.key], with_batch[m.value]
    h, d = m.num_heads, m.head_dim
    if len(m.in_proj) == 1 and query is key is value:
        # Self-attention with packed weights: one product for q, k and v, as torch computes it.
        proj = emit.call(F.linear, query, m.in_proj[0], m.in_proj_bias)  # [N, B, 3E]
        qkv = emit.call_method("permute", emit.call_method("unflatten", proj, -1, (3, h, d)), 2, 1, 3, 0, 4)
        return tuple(emit.call(operator.getitem, qkv, i) for i in range(3))
    weights = m.in_proj if len(m.in_proj) == 3 else _thirds(emit, m.in_proj[0])
    biases = _thirds(emit, m.in_proj_bias) if m.in_proj_bias is not None else (None, None, None)
    return tuple(_split_heads(emit, emit.call(F.linear, x, w, b), h, d)
                 for x, w, b in zip((query, key, value), weights, biases))


def _thirds(emit: Emitter, packed: Node) -> tuple[Node, Node, Node]:
    """q's, k's and v's part of a packed weight [3E, ...] or bias [3E] (torch's chunk(3))."""
    parts = emit.call_method("chunk", packed, 3)
    return tuple(emit.call(operator.getitem, parts, i) for i in range(3))


def _split_heads(emit: Emitter, x: Node, heads: int, head_dim: int) -> Node:
    """[N, B, E] -> [B, H, N, D]: torch's view(N, B·H, D).transpose(0, 1), batch-major."""
    return emit.call_method("permute", emit.call_method("unflatten", x, -1, (heads, head_dim)), 1, 2, 0, 3)


def _merged_mask(emit: Emitter, m: mha_family.Mha, dtype: torch.dtype):
    """(the op's keep-mask or bias, causal, what eager gives on a row with no visible key, spelling);
    `dtype` is the query's, which torch gives a bool mask it converts.

    Masks that only mask (bool, or torch's 0/-inf form of one) become one keep-mask, cheap for the
    kernels: a row with every key masked is NaN with need_weights (softmax of -inf), zeros
    without (SDPA). A float mask is added as eager adds it (attn_mask + key_padding_mask); its
    values are unknown, so a fully masked row gets eager's softmax of its own entries."""
    if m.causal:
        return None, Causal.TOP_LEFT, ("zero", None), ["causal"]
    given = [(x, name) for x, name in ((m.attn_mask, "attn_mask"), (m.key_padding_mask, "key_padding_mask"))
             if x is not None]
    if not given:
        return None, Causal.NONE, ("zero", None), []
    known = [mha_family.masked_positions(x) for x, _ in given]
    if all(known):
        keep = None
        for positions, (_, name) in zip(known, given):
            k = emit.call(torch.logical_not, _score_layout(emit, positions.masked, name, m))
            keep = k if keep is None else emit.call(operator.and_, keep, k)
        return keep, Causal.NONE, ("nan" if m.need_weights else "zero", None), [f"{n}(bool)" for _, n in given]
    bias, spelling = None, []
    for x, name in given:
        if example(x).dtype == torch.bool:  # torch's _canonical_mask: True -> -inf
            x = emit.call_method("masked_fill", emit.call(torch.zeros_like, x, dtype=dtype), x, -math.inf)
            spelling.append(f"{name}(bool)")
        else:
            spelling.append(f"{name}(float)")
        x = _score_layout(emit, x, name, m)
        bias = x if bias is None else emit.call(operator.add, bias, x)
    return bias, Causal.NONE, ("bias_softmax" if m.need_weights else "bias_softmax_sdpa", None), spelling


def _score_layout(emit: Emitter, mask: Node, name: str, m: mha_family.Mha) -> Node:
    """A mask as it broadcasts against the op's [B, H, L, S] scores: key_padding_mask [B, S] as
    [B, 1, 1, S]; attn_mask [L, S] as it is, [B·H, L, S] (batch-major) as [B, H, L, S]."""
    if name == "key_padding_mask":
        if not m.batched:
            mask = emit.call_method("unsqueeze", mask, 0)
        return emit.call_method("unsqueeze", emit.call_method("unsqueeze", mask, 1), 1)
    if example(mask).dim() == 3:
        return emit.call_method("unflatten", mask, 0, (-1, m.num_heads))
    return mask


def _out_projection(emit: Emitter, attn: Node, m: mha_family.Mha) -> Node:
    """[B, H, L, D] -> [L, B, E] (unbatched: [L, E]) through out_proj."""
    merged = emit.call_method("flatten", emit.call_method("permute", attn, 2, 0, 1, 3), -2)
    out = emit.call(F.linear, merged, m.out_proj_weight, m.out_proj_bias)
    return out if m.batched else emit.call_method("squeeze", out, 1)


def _erase_unused_canonical_masks(gm: GraphModule, masks) -> None:
    """Erase nn.MultiheadAttention's `zeros_like(m).masked_fill_(m, -inf)` where the rewrite read
    m instead: the in-place fill writes only the fresh zeros, so nothing else sees it."""
    for mask in masks:
        positions = mha_family.masked_positions(mask) if mask is not None else None
        if positions is None or not positions.canonical:
            continue
        zeros, fill = positions.canonical
        if not fill.users and list(zeros.users) == [fill]:
            gm.graph.erase_node(fill)
            gm.graph.erase_node(zeros)
