"""Find attention sites in a Dynamo graph and replace each with one `flash::fwd` call.

A site is anchored on a softmax (or an SDPA call). From the softmax the matcher walks
- back through score steps (scale, bias, fills, casts: flash_inductor.patterns) to q·kᵀ, and
- forward through casts and dropout to P·V,
requiring every intermediate to have this site as its only user (probabilities that are also
returned or reused leave the site alone). The steps are folded into the op's arguments
(scale, one bias or keep-mask, causal, dropout), the replacement is emitted before P·V, and the
dead nodes are erased. Any guard that fails raises Refusal: the site is logged as skipped and
the graph is left untouched.
"""

from __future__ import annotations

import math
import operator
import re
import time
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, GraphModule, Node

from .. import dispatch
from ..inputs import MASKED_BIAS, Causal, validate
from ..patterns import dropout as dropout_family
from ..patterns import einsum as einsum_family
from ..patterns import gqa, layout, masks, scale as scale_family, scores as scores_family, sdpa as sdpa_family
from ..patterns import softmax as softmax_family
from ..patterns.steps import (Bias, Cast, ClampMin, Fill, MergeBatch, MergeHeads, Refusal, Scale, SplitBatch,
                              SplitHeads, Tanh)
from . import einsum_views
from .emit import Emitter
from .functions import function_bodies, inline_dropout_functions, inline_softmax_functions
from .fx import IN_PLACE_METHODS, canon, constant_value, example
from .report import SiteReport, log, record

_FUNCTIONAL = {"mul_": "mul", "div_": "div", "add_": "add", "sub_": "sub", "masked_fill_": "masked_fill"}


def functionalize_score_updates(graph: Graph) -> None:
    """Turn `scores.div_(s)`-style in-place updates into values the matcher can follow.

    Dynamo records `s.div_(c)` as a node nobody uses, and later reads of `s` still point at the
    product. When `s` is a fresh matmul result (no view of it taken), the in-place op can become
    functional and every later read of `s` read its result instead.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_method" or node.target not in IN_PLACE_METHODS:
            continue
        target = node.args[0]
        if not isinstance(target, Node) or not _is_fresh_scores(target):
            continue
        earlier = [u for u in target.users if order[u] < order[node] and not _reads_only_metadata(u, target)]
        if earlier:  # a view or read taken before the update would see the mutation
            continue
        node.target = _FUNCTIONAL[node.target]
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)


def _is_fresh_scores(node: Node) -> bool:
    """A tensor only this code can see: a score product, the probabilities of a softmax (SEW-D's
    XSoftmax zeroes them in place: `p.masked_fill_(rmask, 0)`), or an update already made
    functional."""
    try:
        if scores_family.match_scores(node) is not None:
            return True
    except Refusal:
        return True
    c = canon(node)
    if c is not None and c.op == "softmax":
        return True
    return c is not None and node.op == "call_method" and c.op in _FUNCTIONAL.values() and _is_fresh_scores(c.node.args[0])


class _Site:
    """What one attention site folds into: the op's arguments as graph values."""

    def __init__(self):
        self.chain: list[Node] = []  # nodes the replacement makes dead
        self.spelling: list[str] = []
        self.dropout_p = 0.0
        # Readers of a chain node that belong to the site (the max of a max-shift): not "used
        # elsewhere" for `_single_user`.
        self.inner_readers: set[Node] = set()
        # The mask of `probs.masked_fill(mask, 0)` between the softmax and P·V, if any.
        self.zeroed_probs: Node | None = None


# x.<method>(node) that reads only node's dtype or shape, never its values.
_METADATA_METHODS = {"type_as", "expand_as", "view_as", "reshape_as"}


def _reads_only_metadata(user: Node, node: Node) -> bool:
    """`x.type_as(node)`, `mask.expand_as(node)` (XLM) and the like: node is not the receiver."""
    if user.op == "call_method" and user.target in _METADATA_METHODS and user.args and user.args[0] is not node:
        return True
    c = canon(user)
    return c is not None and c.op == "cast" and user.args[0] is not node


def _value_users(node: Node) -> list[Node]:
    """Users that read the node's values (not those that read only its dtype or shape, nor dead
    views: ProphetNet's `attn_weights.view(...)`, read only for its `.shape`, which Dynamo leaves
    in the graph with no user)."""
    return [u for u in node.users if not _reads_only_metadata(u, node) and not _dead_and_pure(u)]


def _dead_and_pure(node: Node) -> bool:
    return not node.users and node.op == "call_method" and _is_pure(node)


def _single_user(node: Node, what: str, inner: set = frozenset()) -> None:
    users = [u for u in _value_users(node) if u not in inner]
    if len(users) == 1:
        return
    if any(u.op == "output" for u in users):
        # Returned, or kept alive across a graph break (JetMoE, I-BERT in training): the tensor
        # must exist in memory, so a fused kernel would compute the attention a second time.
        raise Refusal("used_once", f"the {what} ({node.name}) is an output of this compiled graph (returned, or "
                      "still referenced where the model graph-breaks), so it must be materialised and fusing "
                      "would compute the attention twice; attn_implementation='sdpa', or a model without the "
                      "graph break (torch._dynamo.explain lists them), lets the site fuse")
    names = ", ".join(u.name for u in node.users)
    raise Refusal("used_once", f"the {what} ({node.name}) is used elsewhere too ({names})")


def _check_float_cast(node: Node) -> None:
    ev = example(node)
    if ev is None or not ev.dtype.is_floating_point:
        raise Refusal("float_casts", f"{node.name} casts the scores or probabilities to {getattr(ev, 'dtype', '?')}")


def _leads_to_scores(node, depth: int = 12) -> bool:
    """Whether the score chain continues through `node` down to q·kᵀ."""
    for _ in range(depth):
        if not isinstance(node, Node):
            return False
        try:
            if scores_family.match_scores(node) is not None:
                return True
        except Refusal:
            return True  # it is a product; its own guard will speak
        c = canon(node)
        if c is None:
            return False
        if c.op in ("cast", "mul", "div", "masked_fill", "tanh", "clamp_min") or (
            c.op == "reshape" and layout.view_step(c) is not None
        ):
            node = c["x"] if c.op in ("cast", "masked_fill", "reshape", "tanh", "clamp_min") else c["a"]
        elif c.op in ("add", "sub"):
            return _leads_to_scores(c["a"], depth - 1) or _leads_to_scores(c["b"], depth - 1)
        elif c.op == "where":
            return _leads_to_scores(c["a"], depth - 1) or _leads_to_scores(c["b"], depth - 1)
        else:
            return False
    return False


def _score_steps(site: _Site, start: Node):
    """Walk from the softmax input back to q·kᵀ; steps come back in application order."""
    steps = []
    node = start
    while True:
        _single_user(node, "score tensor", site.inner_readers)
        found = scores_family.match_scores(node)
        if found is not None:
            site.chain.append(node)
            site.spelling.insert(0, found.spelling)
            steps = found.steps + steps
            return found, steps
        c = canon(node)
        if c is None:
            why = scores_family.why_not_attention(node)
            if why:
                raise Refusal("einsum_roles", why)
            what = node.target if node.op != "call_function" else getattr(node.target, "__name__", node.target)
            raise Refusal("score_chain", f"the scores pass through {what}, which the rewrite does not model")
        site.chain.append(node)
        if c.op == "cast":
            _check_float_cast(node)
            steps.insert(0, Cast())
            node = c["x"]
            continue
        if c.op == "tanh":
            steps.insert(0, Tanh())
            site.spelling.insert(0, "tanh(softcap)")
            node = c["x"]
            continue
        if c.op == "clamp_min":
            floor = constant_value(c["floor"])
            if floor is None or floor > -masks.EXACT_FILL_MAGNITUDE:
                raise Refusal("clamp", f"the scores are clamped below at {c['floor']}, not at a mask value <= -1e30")
            steps.insert(0, ClampMin(floor, getattr(example(node), "dtype", None)))
            site.spelling.insert(0, f"{c.spelling}(floor)")
            node = c["x"]
            continue
        view = layout.view_step(c)
        if view is not None:
            steps.insert(0, view[0])
            site.spelling.insert(0, view[1])
            node = c["x"]
            continue
        if c.op in ("add", "sub", "where"):
            a, b = (c["a"], c["b"])
            sides = [x for x in (a, b) if _leads_to_scores(x)]
            if len(sides) != 1:
                raise Refusal("score_chain", f"{c.spelling} has {len(sides)} operands that lead to q·kᵀ")
            chain = sides[0]
            other = b if chain is a else a
            if c.op != "where" and isinstance(other, (int, float)):
                # DeBERTa adds `rel_att: int = 0` when it has no relative attention: nothing
                # to fuse. A non-zero constant would shift every score alike, which softmax
                # ignores, except against a fill; no model writes it, so it is not modelled.
                # Nor is `0 - scores` (or an alpha on the scores): not the scores unchanged.
                if other != 0:
                    raise Refusal("score_chain", f"the scores are shifted by the constant {other}")
                if chain is b and (c.op == "sub" or c.get("alpha", 1) != 1):
                    raise Refusal("score_chain", f"{c.spelling} negates or scales the scores")
                node = chain
                continue
            product = canon(chain) if c.op == "add" else None
            if product is not None and product.op == "mul":
                scores = product["a"] if _leads_to_scores(product["a"]) else product["b"]
                fill = masks.match_zero_one_mask(product, scores, other)
                if fill is not None:  # s·b + c·(1 − b): one fill step for the two nodes
                    _single_user(chain, "score tensor", site.inner_readers)
                    site.chain.append(chain)
                    site.spelling.insert(0, f"{product.spelling}(0/1 mask)·{c.spelling}(fill)")
                    steps.insert(0, fill)
                    node = scores
                    continue
            step = masks.match_bias(c, chain) if c.op != "where" else masks.match_fill(c, chain)
            site.spelling.insert(0, f"{c.spelling}({'bias' if c.op != 'where' else 'fill'})")
        elif c.op == "masked_fill":
            chain = c["x"]
            step = masks.match_fill(c, chain)
            site.spelling.insert(0, "masked_fill")
        elif c.op in ("mul", "div"):
            chain = c["a"] if c.op == "div" or _leads_to_scores(c["a"]) else c["b"]
            step = scale_family.match_scale(c, chain, per_row_ok=True)
            site.spelling.insert(0, f"{c.spelling}(scale)")
        else:
            raise Refusal("score_chain", f"the scores pass through {c.op}, which the rewrite does not model")
        steps.insert(0, step)
        node = chain


def _prob_path(site: _Site, softmax: Node, sink_column: bool = False):
    """From the softmax forward to P·V: returns (probabilities fed to P·V, the P·V node, v, the
    einsum's layout or None). With `sink_column`, the softmax's first reader must drop its last
    column (the sink's)."""
    node = softmax
    if sink_column:
        _single_user(node, "attention probabilities")
        node = _value_users(node)[0]
        if not _drops_last_column(node):
            raise Refusal("softmax_over_keys", f"the probabilities over the keys and a sink feed {node.name}, "
                                               "not a slice dropping the sink's column")
        site.chain.append(node)
        site.spelling.append("slice(keys)")
    while True:
        _single_user(node, "attention probabilities")
        user = _value_users(node)[0]
        found = scores_family.match_values(user, node)
        if found is not None:
            return (node, user) + found
        why = scores_family.why_not_attention(user, node)
        if why:
            raise Refusal("einsum_roles", why)
        c = canon(user)
        if c is not None and c.op == "cast":
            _check_float_cast(user)
            site.chain.append(user)
            node = user
            continue
        if c is not None and (layout.merges_heads(c) or layout.split_heads(c) is not None):
            site.chain.append(user)
            site.spelling.append("view(heads)")
            node = user
            continue
        if (c is not None and c.op == "masked_fill" and c["x"] is node and site.zeroed_probs is None
                and isinstance(c["mask"], Node) and constant_value(c["value"]) == 0):
            # Zeroes what the score fill masked (checked against it in `_rewrite_softmax`).
            site.zeroed_probs = c["mask"]
            site.chain.append(user)
            site.spelling.append("masked_fill(probs, 0)")
            node = user
            continue
        if c is not None and c.op == "dropout":
            rate = dropout_family.live_rate(c)
            if rate and site.dropout_p:
                raise Refusal("dropout_once", "two live dropouts on the probabilities")
            site.dropout_p = rate or site.dropout_p
            site.spelling.append("dropout" if rate else "dropout(off)")
            site.chain.append(user)
            node = user
            continue
        what = c.op if c is not None else (getattr(user.target, "__name__", None) or user.target)
        raise Refusal("probs_to_values", f"the probabilities feed {what} before the value product")


def _max_shift(node: Node):
    """x when `node` is x - max(x, dim=-1, keepdim=True) (or amax, or .values): a shift of every
    row by a constant, which softmax ignores (its gradient through the max sums to 0). GPT-OSS
    writes it to keep its bf16 logits from overflowing. Returns (x, the max's nodes) or None."""
    c = canon(node)
    if c is None or c.op != "sub" or c.get("alpha", 1) != 1 or not isinstance(c["b"], Node):
        return None
    x, m = c["a"], c["b"]
    reduce = m
    if m.op == "call_function" and m.target is operator.getitem and m.args[1] == 0:  # max(...).values
        reduce = m.args[0]
    name = reduce.target if reduce.op == "call_method" else getattr(reduce.target, "__name__", None)
    if reduce.op not in ("call_method", "call_function") or name not in ("max", "amax"):
        return None
    if reduce.op == "call_function" and reduce.target not in (torch.max, torch.amax):
        return None
    if (name == "max") == (reduce is m) or not reduce.args or reduce.args[0] is not x:
        return None  # torch.max(x, dim) is a (values, indices) pair read through [0]; amax is the values
    dim = reduce.kwargs.get("dim", reduce.args[1] if len(reduce.args) > 1 else None)
    keepdim = reduce.kwargs.get("keepdim", reduce.args[2] if len(reduce.args) > 2 else False)
    ev = example(x)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if ev is None or not isinstance(dim, int) or dim % ev.dim() != ev.dim() - 1 or keepdim is not True:
        return None
    if len(m.users) != 1 or len(reduce.users) != 1:
        return None
    return x, ([m] if m is reduce else [m, reduce])


def _drops_last_column(node: Node) -> bool:
    """`p[..., :-1]` (or every leading dim sliced whole): the softmax over keys and a sink, its
    sink column dropped."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    src, index = example(node.args[0]), node.args[1]
    if src is None or not isinstance(index, tuple) or not index:
        return False
    *lead, last = index
    whole = slice(None, None, None)
    if lead and lead[0] is Ellipsis:
        lead = lead[1:]
    elif len(index) != src.dim():
        return False
    n = src.shape[-1]
    return (all(x == whole for x in lead) and isinstance(last, slice) and last.start in (None, 0)
            and last.step in (None, 1) and last.stop in (-1, n - 1))


def _peel_sink(site: _Site, node: Node):
    """GPT-OSS's attention sinks: softmax over cat([scores, sink], -1), the sink's column then
    dropped. For a row with logsumexp `lse` over the keys, each key's weight is eager's softmax
    times Z / (Z + e^sink) = sigmoid(lse - sink), and so is the output: exact, for any mask (a
    row with no visible key is 0 in both), and differentiable through the op's lse. Returns (the
    scores, the sink as a [.., Nq, 1] tensor)."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, Node) for p in parts):
        raise Refusal("softmax_over_keys", f"the softmax runs over {node.name}, a concatenation along the key dim "
                                           "of other than the scores and one sink column")
    scores, sink = parts
    es, ek = example(scores), example(sink)
    if (es is None or ek is None or ek.shape[-1] != 1 or es.shape[:-1] != ek.shape[:-1]
            or not _leads_to_scores(scores) or _leads_to_scores(sink)):
        raise Refusal("softmax_over_keys", "the softmax runs over the scores concatenated with logits other "
                                           "than one sink column after them (its denominator holds terms the op has not)")
    _single_user(node, "scores with the sink", site.inner_readers)
    site.chain.append(node)
    site.spelling.insert(0, "cat(sink)")
    return scores, sink


@dataclass
class _Folded:
    scale: float = 1.0
    q_factors: list = field(default_factory=list)  # (node, divide, per_row): tensor-valued scales, folded into q
    bias: Node | None = None  # float additive bias
    keep: Node | None = None  # bool keep-mask
    fill: float | None = None  # the value masked scores are replaced by (-inf or a finite fill)
    softcap: float = 0.0  # c in c·tanh(s / c), 0 when the scores are not soft-capped
    # The biases added after a finite fill (GPT-Neo: where(causal, s, finfo.min) + mask): eager's
    # masked entries are then fill + this, which a fully masked row is the softmax of.
    post_fill: Node | None = None
    # After max(s + bias, floor) over a bias that may hold -inf (XGLM's clamp after a mask that
    # reaches the graph as an input): eager's entries on a fully masked row, max(bias, floor).
    clamped_bias: Node | None = None
    # The 0/1 tensor of a multiplicative mask (`s·b + c·(1 − b)`), whose values the rewrite
    # checks at run time.
    zero_one: Node | None = None


def _fold(steps, emit: Emitter) -> _Folded:
    """Fold score steps, in application order, into the op's scale, bias and keep-mask.

    Masked scores become -inf in the op. For a -inf fill that is exact, fully masked rows
    included (the rewrite turns the op's zero rows back into eager's NaN). For a finite fill
    (finfo.min) it is exact on every row with a visible key, since exp(fill - max) underflows to
    0 for any realistic score; rows with no visible key are patched to eager's uniform average
    of V after the op (see _emit_op), which needs the fill to be the last thing done to the
    scores, up to positive scales and casts.
    """
    st = _Folded()
    cap = None  # after a tanh: the product of the scales applied to it so far
    split_seen = merged = False
    windows = None  # the SplitBatch the scores are viewed through, until viewed back
    for step in steps:
        if isinstance(step, SplitBatch):
            if windows is not None or not all(isinstance(x, int) for x in (step.outer, step.inner)):
                raise Refusal("layout_view", "a 5-D view of the scores nested in another, or with sizes known "
                                             "only at run time")
            windows = step
            continue
        if isinstance(step, MergeBatch):
            if windows is None:
                raise Refusal("layout_view", "5-D scores viewed as 4-D without a split before them")
            windows = None
            continue
        if windows is not None:
            if isinstance(step, Bias):
                step = Bias(_batch_merged(emit, step.term, windows), step.negate)
            elif not (isinstance(step, Cast) or (isinstance(step, Scale) and isinstance(step.factor, (int, float)))):
                raise Refusal("layout_view", "a mask, clamp, cap or tensor scale on scores viewed as 5-D "
                                             "(only biases and constant scales are laid back into 4-D)")
        if isinstance(step, SplitHeads):
            split_seen = True
        if isinstance(step, MergeHeads):
            # The op runs in the split 4-D layout; viewing the scores back to 3-D before the
            # softmax changes nothing it computes, if a split came first and nothing follows.
            if not split_seen:
                raise Refusal("layout_view", "4-D scores merged to 3-D without a split before them")
            merged = True
            continue
        if merged and isinstance(step, (Bias, Fill, ClampMin)):
            raise Refusal("layout_view", "a bias or mask applied after the scores were merged back to 3-D")
        if st.clamped_bias is not None and isinstance(step, (Bias, Fill, Tanh, ClampMin)):
            raise Refusal("clamp", "a bias, mask or cap after a clamp of a bias that may hold -inf")
        if isinstance(step, ClampMin):
            # max(s, floor) with floor <= -1e30 only changes entries below the floor: -inf ones.
            # Without -inf in the bias or fills there are none, and it is exact to drop it.
            if st.fill is not None or st.post_fill is not None:
                if st.fill == -math.inf or _may_hold_neg_inf(st.bias) or st.post_fill is not None:
                    # (after a fill plus a bias, fill + bias may have overflowed to -inf)
                    raise Refusal("clamp", "a clamp after a mask fill and a bias or -inf (it turns empty rows uniform)")
            elif _may_hold_neg_inf(st.bias):
                # A -inf entry becomes the floor. On a row with a visible key that changes
                # nothing (exp(floor - max) underflows to 0, as exp(-inf) does); a row the op finds
                # fully masked is patched with eager's softmax over max(bias, floor) (the scores
                # vanish beside entries <= -1e30, as for every opaque bias: _emit_op).
                b = st.bias
                if step.dtype is not None and getattr(example(b), "dtype", step.dtype) != step.dtype:
                    b = emit.call_method("to", b, step.dtype)  # eager clamps in the scores' dtype
                st.clamped_bias = emit.call_method("clamp_min", b, step.floor)
            continue
        if cap is not None and not isinstance(step, (Scale, Cast, SplitHeads)):
            st.scale, st.softcap, cap = st.scale * cap, cap, None
        if isinstance(step, Cast):
            continue
        if isinstance(step, Tanh):
            # c·tanh(a·qkᵀ / c) with the scales a/c before and c after it: the op's softcap.
            if st.softcap or cap is not None:
                raise Refusal("softcap", "two tanh on the scores")
            if st.bias is not None or st.fill is not None or st.q_factors:
                raise Refusal("softcap", "a bias, mask or tensor scale before the tanh (the op caps the scaled q·kᵀ only)")
            cap = 1.0
            continue
        if isinstance(step, Scale) and cap is not None:
            if not isinstance(step.factor, (int, float)):
                raise Refusal("softcap", "a tensor-valued scale after the tanh")
            cap = cap / step.factor if step.divide else cap * step.factor
            continue
        if isinstance(step, SplitHeads):
            st.bias, st.keep, st.post_fill, st.clamped_bias = (
                _split_heads(emit, x, step) for x in (st.bias, st.keep, st.post_fill, st.clamped_bias))
            continue
        if isinstance(step, Scale):
            f = step.factor
            if isinstance(f, (int, float)):
                if st.fill is not None and not f > 0:
                    raise Refusal("scale_after_mask", f"a scale of {f} after a mask flips the masked scores")
                st.scale = st.scale / f if step.divide else st.scale * f
                if st.fill is not None and st.fill != -math.inf:
                    st.fill = st.fill / f if step.divide else st.fill * f
                    if st.fill > -masks.EXACT_FILL_MAGNITUDE:
                        raise Refusal("fill_is_exact", "a later scale shrinks the mask fill below 1e30 in magnitude")
            else:
                if st.fill is not None:
                    raise Refusal("scale_after_mask", "a tensor-valued scale after a mask (its sign is unknown)")
                st.q_factors.append((f, step.divide, step.per_row))
            if st.clamped_bias is not None and not (isinstance(f, (int, float)) and f > 0):
                raise Refusal("clamp", f"a scale of {f} after a clamp (only positive constants keep its order)")
            op = operator.truediv if step.divide else operator.mul
            st.bias, st.post_fill, st.clamped_bias = (
                x if x is None else emit.call(op, x, f) for x in (st.bias, st.post_fill, st.clamped_bias))
        elif isinstance(step, Bias):
            term = emit.call(operator.neg, step.term) if step.negate else step.term
            st.bias = term if st.bias is None else emit.call(operator.add, st.bias, term)
            if st.fill is not None and st.fill != -math.inf:
                # Exact: the op masks the filled keys (-inf), and a row it finds fully masked is
                # patched with eager's softmax of fill + bias there (_rewrite_softmax).
                st.post_fill = term if st.post_fill is None else emit.call(operator.add, st.post_fill, term)
        elif isinstance(step, Fill):
            if st.post_fill is not None:
                raise Refusal("fill_is_exact", "a mask fill after a bias that followed a finite fill")
            if st.fill is not None and st.fill != step.value:
                raise Refusal("fill_is_exact", f"two masks fill different values ({st.fill:g} and {step.value:g})")
            mask = _unexpanded(step.mask)
            if step.zero_one:
                st.zero_one = mask
                k = emit.call(torch.ne, mask, 0)
            else:
                k = emit.call(torch.logical_not, mask) if step.masked_when else mask
            st.keep = k if st.keep is None else emit.call(operator.and_, st.keep, k)
            st.fill = step.value
    if windows is not None:
        raise Refusal("layout_view", "the softmax runs on scores viewed as 5-D")
    if cap is not None:
        st.scale, st.softcap = st.scale * cap, cap
    if st.softcap and not (st.softcap > 0 and math.isfinite(st.softcap)):
        raise Refusal("softcap", f"the scale after the tanh is {st.softcap:g}; a soft-cap must be positive")
    return st


def _batch_merged(emit: Emitter, term, windows: SplitBatch):
    """A bias added to 5-D [A, W, H, Nq, Nk] scores, as the 4-D [A·W, .., .., ..] term the op
    adds: its two batch dims broadcast to (A, W) and merged (a copy of A·W slices where they
    were broadcast, as small as eager's sum is large); dims it broadcasts after them stay so."""
    ev = example(term)
    if ev is None:  # a number
        return term
    shape = [1] * (5 - ev.dim()) + list(ev.shape)
    if not all(isinstance(x, int) for x in shape):
        raise Refusal("layout_view", "a bias on scores viewed as 5-D with sizes known only at run time")
    if shape[0] == 1 and shape[1] == 1:
        return emit.call_method("reshape", term, 1, *shape[2:])
    full = emit.call_method("expand", emit.call_method("reshape", term, *shape), windows.outer, windows.inner,
                            *shape[2:])
    return emit.call_method("reshape", full, windows.outer * windows.inner, *shape[2:])


def _unexpanded(mask: Node) -> Node:
    """`m.expand_as(scores)` -> m: the op broadcasts masks itself, and dropping the expand
    drops the last reader of the scores, so q·kᵀ is not computed just for its shape."""
    if mask.op == "call_method" and mask.target in ("expand_as", "expand") and isinstance(mask.args[0], Node):
        inner = example(mask.args[0])
        if inner is not None and inner.dim() <= 4:
            return mask.args[0]
    return mask


def _split_heads(emit: Emitter, node, split: SplitHeads):
    """A 3-D [B·H, ...] value as 4-D [B, H, ...]; size-1 leading dims broadcast as they are."""
    ev = example(node)
    if ev is None or ev.dim() < 3 or ev.shape[-3] == 1:
        return node
    return emit.call_method("unflatten", node, -3, (split.batch, split.heads))


def _to_dtype(emit: Emitter, node: Node, dtype: torch.dtype) -> Node:
    ev = example(node)
    return node if ev is not None and ev.dtype == dtype else emit.call_method("to", node, dtype)


def _kernel_line(q, k, v, bias, causal, scale, dropout_p, softcap=0.0) -> tuple[str, str]:
    try:
        inp = validate(q, k, v, bias, causal=causal, scale=scale, dropout_p=dropout_p, softcap=softcap)
    except ValueError as e:
        raise Refusal("op_contract", str(e))
    chosen, why = dispatch.explain_choice(inp)
    if inp.device.type == "cuda" and chosen == "reference":
        # The rewrite must not make a model slower: on a GPU it replaces eager attention only
        # with a fused kernel, never with the PyTorch reference.
        raise Refusal("fused_kernel", f"no fused kernel accepts this site on CUDA ({why})")
    note = dispatch.backward_note(inp, chosen)
    if note:
        chosen = f"{chosen}, {note}"
    return chosen, why


@dataclass
class RunTimeChecks:
    """What a rewrite can prove only on the values (`masks.match_zero_one_mask`): `zero_one` holds
    only 0 and 1; every row with a visible key scores far enough above `fill` (plus the largest
    `post_fill` entry of its row) that eager's exp(fill − row max) is exactly 0, which the op's lse
    bounds: row max >= lse − ln(Nk)."""
    zero_one: Node | None
    fill: float | None
    post_fill: Node | None
    score_dtype: torch.dtype
    site: str




def _emit_run_time_checks(emit: Emitter, res, k, checks: RunTimeChecks) -> None:
    """torch._assert_async in the graph: a clear error (on CUDA a device-side assert), never a
    silently different result, where the values break what the rewrite assumed."""
    advice = " (compile this model with backend='inductor' to keep eager's arithmetic)"
    if checks.zero_one is not None:
        b = checks.zero_one
        ok = emit.call(torch.logical_or, emit.call(torch.eq, b, 0), emit.call(torch.eq, b, 1))
        emit.call(torch._assert_async, emit.call_method("all", ok),
                  f"flash-inductor, {checks.site}: the scores were multiplied by a mask b (s*b + c*(1 - b)) holding "
                  f"values other than 0 and 1{advice}")
    if checks.fill is None:
        return
    nk = example(k).shape[-2]
    if not isinstance(nk, int):
        raise Refusal("fill_is_exact", "a fill above -1e30 checked at run time needs the key length at compile time")
    # exp(x) is exactly 0 below this in the dtype softmax computes in (half types: float32).
    underflow = -750.0 if checks.score_dtype == torch.float64 else -110.0
    ceiling = checks.fill - underflow + math.log(max(nk, 1))
    if checks.post_fill is not None:
        ceiling = emit.call(operator.add, emit.call_method("amax", emit.call_method("float", checks.post_fill), -1),
                            ceiling)
    lse = emit.call(operator.getitem, res, 1)
    ok = emit.call(torch.logical_or, emit.call(torch.isneginf, lse), emit.call(operator.gt, lse, ceiling))
    emit.call(torch._assert_async, emit.call_method("all", ok),
              f"flash-inductor, {checks.site}: a row's scores came within {-underflow:g} of the mask fill "
              f"{checks.fill:g}, where its masked keys get weight in eager and none in the fused op{advice}")


def _emit_op(emit: Emitter, q, k, v, bias, causal: Causal, scale, dropout_p, out_dtype, empty_rows,
             softcap=0.0, sink=None, checks: RunTimeChecks | None = None, lse_out=None):
    """Emit flash::fwd and the output fix-ups; return the node that replaces P·V.

    `empty_rows` says what eager gives on a row with no visible key, where the op gives zeros:
    ("zero", None); ("nan", None) for softmax over a row of -inf; ("uniform", row_mask) for a
    row whose scores were all replaced by one finite fill: the mean of V over all keys;
    ("bias_softmax", None) when the bias's values are unknown (a graph input, say), so such a
    row may mix finfo.min and -inf entries: eager weighs the keys where the row's bias is
    largest, equally (scores vanish beside biases of -1e30: s + b == b), or gives NaN when that
    largest entry is -inf; ("bias_softmax", eager_bias) the same over eager's own entries where
    they differ from the op's bias (a fill followed by a bias); ("bias_softmax_sdpa", None) the
    same with zeros for the -inf rows (SDPA's safe softmax). These cost a second product with V
    (`_softmax_of_bias_rows`).

    `sink`, [.., Nq, 1] in the scores' layout: a logit per row that joined eager's softmax over
    the keys (`_peel_sink`); the output is scaled by sigmoid(lse - sink).

    `lse_out`: (logsumexp nodes of the scores, the scores' dtype, a dict the replacements go
    to, eager's logsumexp on an empty row if one constant): `_lse_for_readers`.
    """
    v_in = v
    q4 = example(q)
    three_d = q4.dim() == 3
    if three_d:  # [B·H, N, D] layouts: one head per batch entry
        q, k, v = (emit.call_method("unsqueeze", x, 1) for x in (q, k, v))
        if bias is not None and example(bias).dim() == 3:
            bias = emit.call_method("unsqueeze", bias, 1)
    kernel = _kernel_line(example(q), example(k), example(v), example(bias) if bias is not None else None,
                          causal, scale, dropout_p, softcap)
    extra = (float(softcap),) if softcap else ()
    if checks is not None and three_d:
        raise Refusal("fill_is_exact", "a mask checked at run time on 3-D [B·H, N, N] scores")
    res = emit.call(torch.ops.flash.fwd.default, q, k, v, bias, None, int(causal), float(scale), float(dropout_p),
                    *extra)
    if checks is not None:
        _emit_run_time_checks(emit, res, k, checks)
    if lse_out is not None:
        _lse_for_readers(emit, res, bias, empty_rows, *lse_out)
    out = emit.call(operator.getitem, res, 0)
    if sink is not None:
        lse = emit.call_method("unsqueeze", emit.call(operator.getitem, res, 1), -1)
        if three_d and example(sink).dim() == 3:
            sink = emit.call_method("unsqueeze", sink, 1)
        # float32 (lse's dtype) until the cast to the output's dtype below
        out = emit.call(operator.mul, out, emit.call(torch.sigmoid, emit.call(operator.sub, lse, sink)))
    kind, row_mask = empty_rows
    zeroed = None
    if kind == "bias_softmax_zeroed":
        (row_mask, zeroed), kind = row_mask, "bias_softmax"
        if three_d and example(zeroed).dim() == 3:
            zeroed = emit.call_method("unsqueeze", zeroed, 1)
    if kind in ("nan", "bias_softmax", "bias_softmax_sdpa"):
        lse = emit.call(operator.getitem, res, 1)
        empty = emit.call_method("unsqueeze", emit.call(torch.isneginf, lse), -1)
        fix = math.nan
        if kind != "nan":
            groups = example(q).shape[1] // example(k).shape[1]
            scores = bias
            if row_mask is not None:  # eager's own row values, given in the scores' layout
                scores = row_mask
                if three_d and example(scores).dim() == 3:
                    scores = emit.call_method("unsqueeze", scores, 1)
            fix = _softmax_of_bias_rows(emit, scores, v, groups, 0.0 if kind == "bias_softmax_sdpa" else math.nan,
                                        zeroed, exact=checks is not None and checks.fill is not None)
        out = emit.call(torch.where, empty, fix, out)
    if three_d:
        out = emit.call_method("squeeze", out, 1)
    if kind == "uniform":
        mean_v = emit.call_method("mean", v_in, -2, keepdim=True)
        groups = example(q).shape[1] // example(k).shape[1]
        if groups > 1:
            mean_v = emit.call_method("repeat_interleave", mean_v, groups, dim=1)
        out = emit.call(torch.where, row_mask, mean_v, out)
    return _to_dtype(emit, out, out_dtype), kernel


def _logsumexp_readers(scores: Node) -> list[Node]:
    """`torch.logsumexp(scores, -1)` (or `scores.logsumexp(dim=-1)`, keepdim either way) beside
    the softmax of the same scores: Granite-SWA's attention sinks, sigmoid(lse - sink) times the
    output. The op returns that lse, so those readers are part of the site."""
    ev = example(scores)
    if ev is None:
        return []
    found = []
    for u in scores.users:
        is_call = u.op == "call_function" and u.target is torch.logsumexp
        if not (is_call or (u.op == "call_method" and u.target == "logsumexp")) or u.args[0] is not scores:
            continue
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
        dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
        keepdim = u.args[2] if len(u.args) > 2 else u.kwargs.get("keepdim", False)
        if isinstance(dim, int) and dim % ev.dim() == ev.dim() - 1 and isinstance(keepdim, bool):
            found.append(u)
    return found


def _empty_row_lse(st, empty_rows) -> float | None:
    """Eager's logsumexp on a row whose every score one constant c <= -1e30 replaced or
    absorbed (a fill, or HF's where(mask, 0, finfo.min) added): c + ln Nk, which is c in float32
    and bfloat16 alike. None where the row's entries are not that one constant."""
    if empty_rows[0] != "uniform":
        return None
    if st.fill is not None:
        return st.fill if st.fill <= -masks.EXACT_FILL_MAGNITUDE else None
    masked = {v for v in (_where_constants(st.bias) or ()) if v <= MASKED_BIAS}
    return masked.pop() if st.keep is None and len(masked) == 1 else None


def _lse_for_readers(emit: Emitter, res: Node, bias, empty_rows, readers: list[Node], dtype,
                     replacements: dict, empty_lse: float | None) -> None:
    """What every logsumexp reader of the scores reads instead, into `replacements`: the op's
    lse (natural log, scale, bias and masks included: eager's logsumexp of the same scores, in
    float32 here, cast to the scores' dtype as eager's is). A row the op reports fully masked (lse -inf) holds in eager only
    entries <= -1e30 beside which the scores vanish (or -inf): its logsumexp is that of the
    bias row, -inf for a row of -inf; for a row one constant fill c <= -1e30 replaced whole,
    c + ln Nk, which is c in float32 and bfloat16 alike."""
    kind, row_values = empty_rows
    lse = emit.call(operator.getitem, res, 1)
    if kind == "bias_softmax" and row_values is None and bias is not None and example(bias).dtype.is_floating_point:
        fix = emit.call(torch.logsumexp, emit.call_method("to", bias, torch.float32), -1)
        lse = emit.call(torch.where, emit.call(torch.isneginf, lse), fix, lse)
    elif kind == "uniform" and empty_lse is not None:
        lse = emit.call(torch.where, emit.call(torch.isneginf, lse), float(empty_lse), lse)
    elif kind != "nan" and not (kind == "zero" and bias is None):  # (no mask: no row is ever empty)
        raise Refusal("lse_reader", "a logsumexp of the scores where a row the op reports fully masked "
                                    f"({kind}) has a logsumexp in eager that the rewrite does not rebuild")
    lse = emit.call_method("to", lse, dtype)
    for r in readers:
        keepdim = r.args[2] if len(r.args) > 2 else r.kwargs.get("keepdim", False)
        replacements[r] = emit.call_method("unsqueeze", lse, -1) if keepdim else lse


_IN_PLACE = (operator.iadd, operator.imul, operator.itruediv, operator.isub)


def _lse_dependents(readers: list[Node], pv: Node, chain: list[Node]) -> list[Node]:
    """The nodes between the readers and P·V that read them, directly or not, in graph order:
    they move after the op (none when the readers follow P·V). Pure computations only (a
    mutation or a random draw must keep its place), and none of the site's own."""
    order = {n: i for i, n in enumerate(pv.graph.nodes)}
    first = min(readers, key=order.__getitem__)
    if order[first] > order[pv]:
        return []
    tainted, later = set(readers), []
    node = first.next
    while node is not pv:
        if any(a in tainted for a in node.all_input_nodes):
            impure = (node.op not in ("call_function", "call_method")
                      or (node.op == "call_method" and node.target.endswith("_"))
                      or node.target in _IN_PLACE or node.is_impure()
                      or "dropout" in str(node.target) or "rand" in str(node.target))
            if impure or node in chain:
                raise Refusal("lse_reader", f"{node.name} reads the scores' logsumexp before the attention's "
                                            "output and cannot move after it")
            tainted.add(node)
            later.append(node)
        node = node.next
    return later


def _softmax_of_bias_rows(emit: Emitter, bias: Node, v: Node, groups: int, neg_inf_row: float,
                          zeroed: Node | None = None, exact: bool = False) -> Node:
    """What eager's softmax gives on rows whose every entry is <= -1e30 (where the scores are
    absorbed: s + b == b in float32): the mean of V over the keys holding the row's largest bias
    value, `neg_inf_row` if that value is -inf. Computed for every row (a [.., Nq, Nk] compare
    and one product with V); the caller keeps it only on the rows the op reports fully masked.
    `zeroed` (bool, True where eager zeroes the probabilities after the softmax): those keys
    keep their share of the normaliser but add nothing. `exact`: the row's entries include a
    fill above -1e30 (plus what was added after it), whose differences count: their softmax."""
    if exact:
        if zeroed is not None:
            raise Refusal("fill_is_exact", "probabilities zeroed beside a fill checked at run time")
        if groups > 1:
            v = emit.call_method("repeat_interleave", v, groups, dim=1)
        weights = emit.call(torch.softmax, emit.call_method("float", bias), -1)
        return emit.call(torch.matmul, emit.call_method("to", weights, example(v).dtype), v)
    top = emit.call_method("amax", bias, -1, keepdim=True)
    at_top = emit.call(operator.eq, bias, top)
    weights = emit.call_method("to", at_top, example(v).dtype)
    count = None
    if zeroed is not None:
        count = emit.call_method("sum", weights, -1, keepdim=True)
        weights = emit.call_method("to", emit.call(operator.and_, at_top, emit.call(torch.logical_not, zeroed)),
                                   example(v).dtype)
    if groups > 1:
        v = emit.call_method("repeat_interleave", v, groups, dim=1)
    mean_v = emit.call(operator.truediv, emit.call(torch.matmul, weights, v),
                       count if count is not None else emit.call_method("sum", weights, -1, keepdim=True))
    return emit.call(torch.where, emit.call(torch.isneginf, top), neg_inf_row, mean_v)


def _finite_masked_constant(bias: Node | None) -> bool:
    """where(mask, a, b) whose constants include a finite one <= -1e30 (finfo.min)."""
    fills = _where_constants(bias) if bias is not None else None
    return fills is not None and any(math.isfinite(v) and v <= MASKED_BIAS for v in fills)


def _may_hold_neg_inf(bias: Node | None) -> bool:
    """False when the bias is provably finite: where(mask, finite, finite), as HF's mask helpers
    make it (possibly scaled by a positive constant afterwards)."""
    if bias is None:
        return False
    fills = _where_constants(bias)
    return fills is None or not all(math.isfinite(v) for v in fills)


def _fills_below_masked_bias(bias: Node | None) -> bool:
    """where(mask, a, b) with a constant <= MASKED_BIAS (HF's finfo.min masks), possibly scaled:
    the op masks those keys, where eager gives them equal scores, so a row of nothing else is
    averaged."""
    fills = _where_constants(bias) if bias is not None else None
    return fills is not None and any(v <= MASKED_BIAS for v in fills)


def _where_constants(bias: Node):
    """(a, b) when `bias` is where(mask, a, b) with constant a and b (zeros count as 0), times or
    divided by positive constants (a bias added before the scale); else None."""
    factor = 1.0
    c = canon(bias)
    while c is not None and c.op in ("mul", "div"):
        f = constant_value(c["b"])
        inner = c["a"]
        if f is None and c.op == "mul":
            f, inner = constant_value(c["a"]), c["b"]
        if f is None or not f > 0 or not isinstance(inner, Node):
            return None
        factor = factor / f if c.op == "div" else factor * f
        c = canon(inner)
    if c is None or c.op != "where":
        return None
    ex = example(bias)
    big = torch.finfo(ex.dtype).max if ex is not None and ex.dtype.is_floating_point else math.inf
    values = []
    for x in (c["a"], c["b"]):
        v = constant_value(x)
        if v is None and isinstance(x, Node) and x.op == "call_function" and x.target in (torch.zeros, torch.zeros_like):
            v = 0.0
        if v is None:
            return None
        v *= factor
        values.append(v if abs(v) <= big else math.copysign(math.inf, v))  # overflows as the tensor would
    return tuple(values)


def _masked_rows(emit: Emitter, bias: Node) -> Node:
    """[..., Nq, 1] bool: rows whose every key the op masks (its bias or keep-mask says so)."""
    if example(bias).dtype == torch.bool:
        return emit.call_method("all", emit.call(torch.logical_not, bias), -1, keepdim=True)
    return emit.call_method("all", emit.call(operator.le, bias, MASKED_BIAS), -1, keepdim=True)


def _check_zeroed_probs(mask: Node, steps, st) -> None:
    """`probs.masked_fill(mask, 0)` follows only one score fill by the same mask node: it then
    zeroes entries softmax already gave 0 on every row with a visible key. Beside a bias the fill
    must be finite: a -inf fill leaves NaN rows that the zeroing only partly clears."""
    fills = [s for s in steps if isinstance(s, Fill)]
    if len(fills) != 1 or fills[0].mask is not mask or not fills[0].masked_when:
        raise Refusal("probs_fill", "the probabilities are zeroed by a mask that is not the score fill's own mask")
    if st.bias is not None and st.fill == -math.inf:
        raise Refusal("probs_fill", "the probabilities are zeroed after a -inf fill beside a bias")


def _eager_fill_bias(emit: Emitter, st, dtype) -> Node:
    """Eager's entries on a row the op reports fully masked, for a finite fill beside a bias:
    the bias where kept (it may hold -inf: MPT's) and the fill, plus any bias added after it
    (GPT-Neo's), where filled; in the scores' dtype, so finfo.min + finfo.min overflows to -inf
    as in eager (the scores vanish beside entries <= -1e30)."""
    filled = st.fill
    if st.post_fill is not None:
        filled = emit.call(operator.add, emit.call_method("to", st.post_fill, dtype), st.fill)
    return emit.call(torch.where, st.keep, emit.call_method("to", st.bias, dtype), filled)


def _rewrite_softmax(gm: GraphModule, node: Node, call, behind_concat: bool = False) -> SiteReport:
    site = _Site()
    start = softmax_family.key_dim_input(call)
    site.spelling.append("softmax(fp32)" if call.get("dtype") is not None else "softmax")
    shift = _max_shift(start)
    if shift is not None:
        _single_user(start, "shifted scores")
        site.chain.append(start)
        site.chain.extend(shift[1])
        site.inner_readers.add(shift[1][-1])
        site.spelling.insert(0, "sub(max)")
        start = shift[0]
    sink = None
    if _concat_on_last_dim(start):
        start, sink = _peel_sink(site, start)
    elif behind_concat:
        raise Refusal("softmax_over_keys", "the softmax runs over the scores concatenated with other logits along "
                                           "the key dim, not as GPT-OSS's sinks (max-shifted, then one column)")
    lse_readers = _logsumexp_readers(start)
    site.inner_readers.update(lse_readers)
    if lse_readers:
        site.spelling.insert(0, "logsumexp")
    found, steps = _score_steps(site, start)
    probs, pv, v, v_layout = _prob_path(site, node, sink_column=sink is not None)
    site.spelling.append(pv_spelling(pv))
    site.chain.insert(0, node)
    k_node = found.k
    emit = Emitter(gm.graph, pv)
    try:
        if k_node is None:
            k_node = emit.call_method("transpose", found.key_t, -1, -2)
        q_node = found.q
        layouts = _einsum_layouts(found, v_layout, steps, probs, v)
        if layouts is not None:  # an einsum in its own order: q, k and v reach the op as views
            s_lay, v_lay = layouts
            n = s_lay.n_batch
            sizes = einsum_views.batch_sizes(emit, q_node, s_lay.operand_perms[0], n)
            q_node, k_node = (einsum_views.operand(emit, x, perm, n, name)
                              for x, perm, name in zip((q_node, k_node), s_lay.operand_perms, "qk"))
            v = einsum_views.operand(emit, v, v_lay.operand_perms[0], n, "v")
        k_src, k_rep = gqa.unrepeated(k_node)
        v_src, v_rep = gqa.unrepeated(v)
        if k_rep == v_rep and k_rep > 1:
            k_node, v = k_src, v_src
            site.spelling.append("gqa")
        split = next((s for s in steps if isinstance(s, SplitHeads)), None)
        if split is None and example(start).dim() == 4 and example(v).dim() == 3:
            split = SplitHeads(emit.call_method("size", q_node, 0), emit.call_method("size", q_node, 1))
        if split is not None:  # run the op in 4-D; the P·V node's own layout is restored below
            q_node, k_node, v = (_split_heads(emit, x, split) if example(x).dim() == 3 else x
                                 for x in (q_node, k_node, v))
        st = _fold(steps, emit)
        small_fill = st.fill is not None and -masks.EXACT_FILL_MAGNITUDE < st.fill < 0
        checks = None
        if st.zero_one is not None or small_fill:
            if layouts is not None or split is not None or sink is not None or site.zeroed_probs is not None:
                raise Refusal("fill_is_exact", "a mask checked at run time (s·b + c·(1 − b)) on scores laid out by an "
                                               "einsum or viewed between 3-D and 4-D, beside sinks or zeroed probabilities")
            checks = RunTimeChecks(st.zero_one, st.fill if small_fill else None, st.post_fill,
                                   example(start).dtype, site_name(node))
        for f, divide, per_row in st.q_factors:
            if per_row:
                _check_row_factor(f, q_node, split is not None or layouts is not None)
            q_node = emit.call(operator.truediv if divide else operator.mul, q_node, f)
        bias = st.bias
        if st.keep is not None:
            bias = st.keep if bias is None else emit.call(torch.where, st.keep, bias, -math.inf)
        out_dtype = example(pv).dtype
        q_node, k_node, v = (_to_dtype(emit, x, out_dtype) for x in (q_node, k_node, v))
        _check_score_shape(q_node, k_node)
        opaque = st.bias is not None and _where_constants(st.bias) is None
        if site.zeroed_probs is not None:
            _check_zeroed_probs(site.zeroed_probs, steps, st)
            # Eager zeroes the probabilities the fill masked: a no-op on a row with a visible
            # key (the fill's weights are exactly 0 there). A row the fill masks whole becomes
            # 0, the op's own empty row; beside a bias, a row the op reports empty gets eager's
            # softmax over its own entries with the filled keys' weights zeroed.
            if st.bias is None:
                empty_rows = ("zero", None)
            elif layouts is not None:
                raise Refusal("layout_view", "probabilities zeroed beside a bias, on scores laid out by an einsum")
            else:
                empty_rows = ("bias_softmax_zeroed", (_eager_fill_bias(emit, st, example(start).dtype),
                                                      site.zeroed_probs))
        elif st.clamped_bias is not None:
            empty_rows = ("bias_softmax", st.clamped_bias)
        elif st.fill is not None and st.fill != -math.inf and st.bias is not None:
            empty_rows = ("bias_softmax", _eager_fill_bias(emit, st, example(start).dtype))
        elif st.fill is not None and st.fill != -math.inf:
            empty_rows = ("uniform", _masked_rows(emit, bias))
        elif opaque or (st.fill == -math.inf and _finite_masked_constant(st.bias)):
            # finfo.min entries may share a fully masked row with -inf ones (or nothing is known)
            empty_rows = ("bias_softmax", None)
        elif st.fill == -math.inf or _may_hold_neg_inf(st.bias):
            empty_rows = ("nan", None)
        elif _fills_below_masked_bias(st.bias):
            empty_rows = ("uniform", _masked_rows(emit, bias))
        else:
            empty_rows = ("zero", None)
        if sink is not None:
            if layouts is not None or split is not None or any(isinstance(x, MergeHeads) for x in steps):
                raise Refusal("layout_view", "attention sinks on scores viewed between 3-D and 4-D or laid out "
                                             "by an einsum")
            # A row with no visible key: eager's weight goes to the sink alone, a zero output,
            # as the op's zero row times sigmoid(-inf - sink) gives.
            empty_rows = ("zero", None)
        if layouts is not None:  # what broadcast against the einsum's scores, now against the op's
            bias, copied = einsum_views.score_tensor(emit, bias, s_lay, sizes)
            rows, _ = einsum_views.score_tensor(emit, empty_rows[1], s_lay, sizes)
            empty_rows = (empty_rows[0], rows)
            if copied:
                site.spelling.append("copy(bias)")
        if lse_readers and (layouts is not None or split is not None or sink is not None or checks is not None
                            or any(isinstance(x, MergeHeads) for x in steps) or example(start).dim() != 4):
            raise Refusal("lse_reader", "a logsumexp of the scores beside sinks, a mask checked at run time, or "
                                        "scores not in the op's [B, H, Nq, Nk] layout")
        lse_out = None
        if lse_readers:
            later = _lse_dependents(lse_readers, pv, site.chain)
            lse_out = (lse_readers, example(start).dtype, {}, _empty_row_lse(st, empty_rows))
        new, kernel = _emit_op(emit, q_node, k_node, v, bias, Causal.NONE, st.scale, site.dropout_p, out_dtype,
                               empty_rows, st.softcap, sink, checks, lse_out)
        if layouts is not None:
            new = einsum_views.result(emit, new, v_lay, sizes)
        elif example(new).dim() == 4 and example(pv).dim() == 3:
            new = emit.call_method("flatten", new, 0, 1)
    except Refusal:
        emit.rollback()
        raise
    pv.replace_all_uses_with(new)
    if lse_out is not None:
        # The readers' values now come from the op, emitted just before P·V: what used them
        # moves there too, in its order.
        for reader, replacement in lse_out[2].items():
            reader.replace_all_uses_with(replacement)
        for n in later:
            pv.prepend(n)
    _erase_dead([pv] + lse_readers + site.chain, gm.graph)
    return SiteReport(site_name(node), True, "·".join(site.spelling), *kernel)


def _check_row_factor(f: Node, q: Node, relaid: bool) -> None:
    """A scale tensor constant along the keys folds into q only where it broadcasts against q
    as it did against the scores, without widening q: q [.., Nq, D] and the scores [.., Nq, Nk]
    share every dim but the last, which the factor holds at size 1."""
    if relaid:
        raise Refusal("scale_is_scalar", "a scale tensor on scores that are viewed between 3-D and 4-D "
                                         "or laid out by an einsum (its dims would no longer line up with q's)")
    fq, ff = example(q), example(f)
    if fq is None or ff is None or tuple(torch.broadcast_shapes(fq.shape, ff.shape)) != tuple(fq.shape):
        raise Refusal("scale_is_scalar", f"a scale tensor of shape {tuple(ff.shape) if ff is not None else '?'} "
                                         "that would widen q when folded into it")


def _einsum_layouts(found, v_layout, steps, probs: Node, v: Node):
    """(scores' layout, values' layout) when either product is an einsum in its own dim order (or
    with more than batch and heads before N); None when both are [.., N, D] already, as
    matmul's are. A matmul on the other side is laid out as the einsum's must then be."""
    s_lay, v_lay = found.layout, v_layout
    if all(x is None or x.trivial for x in (s_lay, v_lay)):
        return None
    if any(isinstance(s, (SplitHeads, MergeHeads, SplitBatch, MergeBatch)) for s in steps):
        raise Refusal("layout_view", "an einsum in its own dim order, with the scores viewed between 3-D and 4-D "
                                     "or 4-D and 5-D")
    n = example(probs).dim() - 2
    for lay, what in ((s_lay, "scores"), (v_lay, "values")):
        if lay is None and n > 2:
            raise Refusal("einsum_roles", f"a {n + 2}-D matmul for the {what} beside an einsum")
    s_lay = s_lay or einsum_family.matmul_layout(n)
    if v_lay is None:
        v_lay = einsum_family.matmul_layout(n)
        if tuple(example(v).shape[:-2]) != tuple(example(probs).shape[:-2]):
            raise Refusal("value_operands", "the value matmul broadcasts V's batch dims")
    if s_lay.roles != v_lay.roles:
        raise Refusal("einsum_roles", f"the value product reads the probabilities' dims as "
                                      f"{''.join(v_lay.roles)}, the scores are {''.join(s_lay.roles)} "
                                      "(b: batch or heads)")
    return s_lay, v_lay


def site_name(node: Node) -> str:
    """The module path Dynamo recorded for the node (e.g. encoder.layer.0.attention.self)."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        names = re.findall(r"_modules\['([^']+)'\]", path) or re.findall(r"\.(\w+)", path)
        return f"{'.'.join(names)}/{node.name}" if names else node.name
    return node.name


def pv_spelling(pv: Node) -> str:
    c = canon(pv)
    return c.spelling if c is not None else "einsum"


def _check_score_shape(q, k) -> None:
    """q·kᵀ of the operands we pass must be the score tensor eager computed (no batch broadcast)."""
    eq, ek = example(q), example(k)
    if eq.dim() != ek.dim():
        raise Refusal("score_operands", f"q is {eq.dim()}-D but k is {ek.dim()}-D")
    if eq.dim() == 4 and (eq.shape[0] != ek.shape[0]):
        raise Refusal("score_operands", f"q batch {eq.shape[0]} and k batch {ek.shape[0]} differ (broadcast batch)")
    if eq.dim() not in (3, 4):
        raise Refusal("score_operands", f"{eq.dim()}-D attention (the op takes 3-D or 4-D)")


def _rewrite_sdpa(gm: GraphModule, node: Node, call) -> SiteReport:
    m = sdpa_family.match_sdpa(call)
    emit = Emitter(gm.graph, node)
    spelling = ["sdpa"]
    try:
        k, v = m.k, m.v
        k_src, k_rep = gqa.unrepeated(k)
        v_src, v_rep = gqa.unrepeated(v)
        if k_rep == v_rep and k_rep > 1:
            k, v = k_src, v_src
            spelling.append("gqa")
        if example(m.q).shape[1] != example(k).shape[1] and not (m.enable_gqa or k is k_src):
            raise Refusal("sdpa_heads", "q and k head counts differ without enable_gqa")
        if m.mask is not None:
            spelling.append("mask(bool)" if example(m.mask).dtype == torch.bool else "mask(float)")
        if m.causal:
            spelling.append("causal")
        if m.dropout_p:
            spelling.append("dropout")
        q = m.q
        if isinstance(m.scale, Node):
            q, scale = emit.call(operator.mul, q, m.scale), 1.0
        else:
            scale = m.scale if m.scale is not None else 1.0 / math.sqrt(example(m.q).shape[-1])
        out_dtype = example(node).dtype
        # The op broadcasts the mask itself: HF expands [B, 1, 1, N] padding masks to the score
        # shape, which, traced, the kernels' glue would otherwise copy at full size.
        mask = _unexpanded(m.mask) if m.mask is not None else None
        # SDPA returns zeros on a row of -inf (as the op does), but averages a row of finite
        # fills, which the op masks: all keys for a known finfo.min mask, the keys holding the
        # row's largest value for a float mask whose values are unknown.
        if _fills_below_masked_bias(mask):
            empty_rows = ("uniform", _masked_rows(emit, mask))
        elif mask is not None and example(mask).is_floating_point() and _where_constants(mask) is None:
            empty_rows = ("bias_softmax_sdpa", None)
        else:
            empty_rows = ("zero", None)
        new, kernel = _emit_op(emit, q, k, v, mask, Causal.TOP_LEFT if m.causal else Causal.NONE,
                               scale, m.dropout_p, out_dtype, empty_rows)
    except Refusal:
        emit.rollback()
        raise
    node.replace_all_uses_with(new)
    _erase_dead([node], gm.graph)
    return SiteReport(site_name(node), True, "·".join(spelling), *kernel)


def _concat_on_last_dim(node: Node) -> bool:
    """`torch.cat([...], dim=-1)` (or its last dim spelled out)."""
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    out = example(node)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return out is not None and isinstance(dim, int) and dim % out.dim() == out.dim() - 1


def _is_product(node: Node) -> bool:
    """matmul / bmm / baddbmm / einsum: what computes q·kᵀ or P·V, however it is spelled."""
    c = canon(node)
    return (c is not None and c.op in ("matmul", "baddbmm")) or (
        node.op == "call_function" and node.target is torch.einsum)


def _scores_upstream(node, depth: int = 24) -> str | None:
    """Whether a product (matmul/bmm/einsum/baddbmm) with the softmax input's last two dims
    [Nq, Nk] lies within `depth` nodes upstream of it, through any ops. Broader than
    `_leads_to_scores` on purpose: a real attention softmax whose chain the rewrite cannot
    model must still be reported as skipped; an MoE router's softmax over [tokens, experts]
    has no such product (the attention's P·V upstream of it is [N, D]).

    "direct" when found; "concat" when found only behind a concatenation along the last dim
    with fewer keys than the softmax's (GPT-OSS appends a sink logit per head: [Nq, Nk + 1]);
    None when neither."""
    ev = example(node)
    if ev is None or ev.dim() < 2:
        return None
    want = tuple(ev.shape[-2:])
    found = None
    seen, frontier = set(), [(node, False)]
    for _ in range(depth):
        nxt = []
        for n, behind_cat in frontier:
            if not isinstance(n, Node) or n in seen:
                continue
            seen.add(n)
            out = example(n)
            if _is_product(n) and out is not None and out.dim() >= 2:
                shape = tuple(out.shape[-2:])
                if shape == want and not behind_cat:
                    return "direct"
                if behind_cat and shape[0] == want[0] and shape[1] < want[1]:
                    found = "concat"
            cat = behind_cat or _concat_on_last_dim(n)
            nxt.extend((a, cat) for a in n.all_input_nodes)
        frontier = nxt
        if not frontier:
            break
    return found


# What probabilities pass through on their way to P·V without being mixed with anything else:
# layout (views, pads, strided windows, slices), casts, dropout, and a constant fill.
_PROBS_CARRIERS_FN = {
    torch.nn.functional.pad, torch._C._nn.pad, torch.nn.functional.dropout, torch.as_strided, operator.getitem, torch.narrow,
    torch.masked_fill, torch.transpose, torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze, torch.permute,
}
_PROBS_CARRIERS_METHOD = {
    "view", "reshape", "transpose", "permute", "contiguous", "as_strided", "unsqueeze", "squeeze", "flatten",
    "unflatten", "to", "type", "type_as", "float", "half", "bfloat16", "narrow", "masked_fill", "clone", "expand",
}


def _carries_probs(node: Node, gm_modules: dict) -> bool:
    if node.op == "call_function":
        return node.target in _PROBS_CARRIERS_FN
    if node.op == "call_method":
        return node.target in _PROBS_CARRIERS_METHOD
    if node.op == "call_module":
        return isinstance(gm_modules.get(node.target), torch.nn.Dropout)
    return False


def _weights_values(node: Node, gm_modules: dict, depth: int = 16) -> Node | None:
    """The product (matmul/bmm/einsum) that takes a softmax's output, carried only through
    layout, casts, dropout and constant fills (`_carries_probs`), as one operand beside another
    activation: what attention does with its probabilities (P·V), however it lays them out
    first. An MoE router's weights go to top-k, indexing or an elementwise product instead.
    None when there is none within `depth` nodes."""
    seen, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            for u in n.users:
                if _is_product(u) and any(a is not n and a.op != "get_attr" for a in u.all_input_nodes):
                    return u
                if _carries_probs(u, gm_modules):
                    nxt.append(u)
        frontier = nxt
        if not frontier:
            break
    return None


def _erase_dead(nodes, graph: Graph) -> None:
    """Erase the site's replaced nodes, then whatever pure node only they read (kᵀ, casts, kᵀ/scale)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    pending = sorted(set(nodes), key=order.get, reverse=True)
    erased = set()
    while pending:
        n = pending.pop(0)
        for dead in [u for u in n.users if _dead_and_pure(u)]:  # `_value_users` did not count them
            graph.erase_node(dead)
        if n in erased or n.users:
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)
        for a in inputs:
            if a not in erased and not a.users and _is_pure(a):
                pending.append(a)


def _is_pure(node: Node) -> bool:
    """A node the patterns know that mutates nothing (in-place updates are never erased)."""
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True  # expand_as / view_as / type_as: views and casts, nothing mutated
    if node.op == "call_function" and node.target is torch.full:
        return True  # a constant (XGLM's finfo.min floor)
    if canon(node) is None:
        return False
    if node.op == "call_method" and node.target.endswith("_"):
        return False
    return not (node.op == "call_function" and node.target in _IN_PLACE)


def _softmaxes_inside_functions(gm: GraphModule) -> list[SiteReport]:
    """Attention computed inside a custom autograd.Function (SEW-D's XSoftmax in training):
    Dynamo traces it as one `autograd_function_apply` node whose forward and backward are
    subgraphs of the Function's own. The rewrite does not replace them (the backward is the
    Function's), but a softmax in the forward whose result weights values (`_weights_values`)
    or whose input is q·kᵀ (`_scores_upstream`) is reported, never passed over silently."""
    reports = []
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        bodies = function_bodies(gm, node)
        if bodies is None:
            continue
        fwd, body = bodies[0], node.args[0]
        if not any((c := canon(n)) is not None and c.op == "softmax" for n in fwd.graph.nodes):
            continue
        inputs = [a for a in node.args[2:] if isinstance(a, Node)]
        if _weights_values(node, modules) is None and not any(_scores_upstream(a) for a in inputs):
            continue
        reports.append(SiteReport(site_name(node), False, guard="autograd_function", reason=(
            f"the softmax runs inside a custom torch.autograd.Function ({body.target}, traced as "
            "autograd_function_apply): its forward and backward are the Function's own, which the rewrite "
            "does not replace")))
    return reports


def rewrite_graph(gm: GraphModule, graph_name: str = "") -> list[SiteReport]:
    """Rewrite every attention site of a Dynamo graph in place; return one report per site."""
    from .mha import rewrite_one_call_sites  # it builds on this module's _emit_op

    start = time.perf_counter()
    inline_softmax_functions(gm)  # SEW-D's XSoftmax in training: an autograd.Function
    inline_dropout_functions(gm)  # and its StableDropout on those probabilities
    functionalize_score_updates(gm.graph)
    reports = rewrite_one_call_sites(gm, graph_name)  # nn.MultiheadAttention, WavLM: one node, no softmax
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph:  # erased by an earlier site
            continue
        call = canon(node)
        if call is None or call.op not in ("softmax", "sdpa"):
            continue
        upstream = _scores_upstream(call["x"]) if call.op == "softmax" else "direct"
        if upstream is None:
            pv = _weights_values(node, dict(gm.named_modules()))
            if pv is None:
                # A softmax over something no product of two activations feeds, whose output
                # weights no product either (an MoE router's): not attention, not a site.
                log.debug("flash-inductor: %s is not an attention softmax (no q·kᵀ upstream)", node.name)
                continue
            # Probabilities that weight values, over scores that are no [Nq, Nk] product
            # (Longformer's banded sliding-window scores, copied chunk by chunk into a
            # [B, N, H, 2w + 1] buffer): attention the op cannot take, reported, never silent.
            rep = SiteReport(site_name(node), False, guard="scores_not_a_product", reason=(
                f"the softmax's probabilities weight values in {pv.name}, but no q·kᵀ product of "
                f"the softmax input's last two dims {tuple(example(call['x']).shape[-2:])} lies upstream "
                "(banded, gathered or otherwise assembled scores): the op computes every query against "
                "every key"))
            rep.graph = graph_name
            record(rep)
            reports.append(rep)
            continue
        try:
            rep = (_rewrite_softmax(gm, node, call, upstream == "concat") if call.op == "softmax"
                   else _rewrite_sdpa(gm, node, call))
        except Refusal as r:
            rep = SiteReport(site_name(node), False, guard=r.guard, reason=r.reason)
        rep.graph = graph_name
        record(rep)
        reports.append(rep)
    for rep in _softmaxes_inside_functions(gm):
        rep.graph = graph_name
        record(rep)
        reports.append(rep)
    gm.graph.lint()
    gm.recompile()
    elapsed_ms = (time.perf_counter() - start) * 1e3
    from torch._dynamo.utils import counters

    counters["flash_inductor"]["rewrite_us"] += int(elapsed_ms * 1e3)  # start-up cost, summed over graphs
    log.info("flash-inductor: %s rewritten in %.1f ms (%d site(s))", graph_name or "graph", elapsed_ms, len(reports))
    return reports
