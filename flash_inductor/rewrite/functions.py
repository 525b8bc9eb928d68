"""Masked softmaxes written as a custom torch.autograd.Function, inlined so the matcher sees them.

Why: SEW-D (and DeBERTa before transformers 4.3x) computes its attention probabilities with
`XSoftmax`, an autograd.Function whose forward is fill, softmax, zero the filled entries, and
whose backward is `torch._softmax_backward_data` of the saved output. Dynamo traces it as one
`autograd_function_apply` node with the two bodies as subgraphs, where the rewrite does not look:
a training graph showed no attention at all. That backward is exactly autograd's own gradient of
that forward (the filled entries' gradient is 0 both ways, and the output it saves is the one
the zeroing produced), so the forward's nodes can replace the node in the graph without changing
any value or gradient, and the site is then an ordinary one (matcher.py follows the zeroing).

SEW-D's dropout on those probabilities is a Function too (`StableDropout` / `XDropout`): a keep
mask drawn with `bernoulli_`, `x.masked_fill(mask, 0) * 1/(1-p)` forward, the same mask and scale
on the gradient backward. That is `F.dropout(x, p, training=True)` in distribution and in its
gradient, though not in its random stream (no two dropout implementations share one), so on the
attention probabilities (a softmax's output) the Function is replaced by that call, which the
dropout family then carries into the op. Elsewhere it is left alone.

Only these shapes are inlined; any other Function keeps its own backward and is reported by the
matcher (`autograd_function`).
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import GraphModule, Node

from .fx import canon, example

_GRAD_MODE = (torch._C._set_grad_enabled,)


def _body(gm: GraphModule, node) -> GraphModule | None:
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    body = getattr(gm, node.target, None)
    return body if isinstance(body, GraphModule) else None


def function_bodies(gm: GraphModule, node: Node) -> tuple[GraphModule, GraphModule] | None:
    """(forward, backward) subgraphs when `node` applies a custom autograd.Function
    (`autograd_function_apply`), else None."""
    if node.op != "call_function" or "autograd_function_apply" not in str(node.target) or len(node.args) < 3:
        return None
    fwd, bwd = _body(gm, node.args[0]), _body(gm, node.args[1])
    return None if fwd is None or bwd is None else (fwd, bwd)


def _compute_nodes(g: GraphModule) -> list[Node]:
    return [n for n in g.graph.nodes
            if n.op not in ("placeholder", "output") and not (n.op == "call_function" and n.target in _GRAD_MODE)]


def _softmax_backward(bwd: GraphModule):
    """(index of the differentiable input, softmax dim) when the backward is exactly
    `_softmax_backward_data(grad, saved, dim, dtype)` for one input and None for the others."""
    placeholders = [n for n in bwd.graph.nodes if n.op == "placeholder"]
    compute = _compute_nodes(bwd)
    if len(placeholders) != 2 or len(compute) != 1:
        return None
    grad_node = compute[0]
    if grad_node.target is not torch._softmax_backward_data or grad_node.args[:2] != tuple(placeholders):
        return None
    (outputs,) = [n for n in bwd.graph.nodes if n.op == "output"][0].args
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    grads = [i for i, o in enumerate(outputs) if o is grad_node]
    if len(grads) != 1 or any(o is not None for i, o in enumerate(outputs) if i != grads[0]):
        return None
    return grads[0], grad_node.args[2]


def _masked_softmax_forward(fwd: GraphModule, x_index: int, dim) -> Node | None:
    """The softmax node when the forward is softmax(x or x.masked_fill(mask, c), dim), optionally
    zeroed in place with `masked_fill_(mask2, 0)`, returned and saved, and nothing else reads x
    or the probabilities."""
    placeholders = [n for n in fwd.graph.nodes if n.op == "placeholder"]
    if x_index >= len(placeholders):
        return None
    x = placeholders[x_index]
    softmaxes = [n for n in _compute_nodes(fwd) if n.target in (torch.softmax, torch.nn.functional.softmax)
                 or (n.op == "call_method" and n.target == "softmax")]
    if len(softmaxes) != 1:
        return None
    sm = softmaxes[0]
    sm_dim = sm.kwargs.get("dim", sm.args[1] if len(sm.args) > 1 else None)
    if sm_dim != dim or len(sm.args) > 2 or set(sm.kwargs) - {"dim"}:
        return None
    source = sm.args[0]
    fill_mask = None
    if source is not x:
        filled = source
        is_fill = (filled.op == "call_method" and filled.target == "masked_fill") or (
            filled.op == "call_function" and filled.target is torch.masked_fill)
        if not is_fill or filled.args[0] is not x or len(filled.users) != 1:
            return None
        fill_mask = filled.args[1]
    if len(x.users) != 1:
        return None
    for user in sm.users:
        if user.op == "output":
            continue
        # Zeroing the filled entries keeps the saved output's softmax gradient exact (they are 0
        # on every row with a visible key, and a row filled whole has no gradient to x); zeroing
        # anything else would make the Function's backward differ from autograd's.
        if not (user.op == "call_method" and user.target == "masked_fill_" and user.args[0] is sm
                and len(user.args) == 3 and user.args[2] == 0 and not user.users
                and fill_mask is not None and user.args[1] is fill_mask):
            return None
    (out,) = [n for n in fwd.graph.nodes if n.op == "output"][0].args
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and tuple(out[0]) == (sm,) and tuple(out[1]) == (sm,)):
        return None
    return sm


def inline_softmax_functions(gm: GraphModule) -> int:
    """Replace every recognised masked-softmax autograd.Function with its forward's nodes; return
    how many were inlined."""
    inlined = 0
    for node in list(gm.graph.nodes):
        bodies = function_bodies(gm, node)
        if bodies is None:
            continue
        fwd, bwd = bodies
        found = _softmax_backward(bwd)
        if found is None:
            continue
        sm = _masked_softmax_forward(fwd, *found)
        if sm is None:
            continue
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue
        inputs = list(node.args[2:])
        # The Function gives the other inputs no gradient: inlined, one that requires grad would get one.
        others = [example(a) for i, a in enumerate(inputs) if i != found[0] and isinstance(a, Node)]
        if any(ev is None or (ev.is_floating_point() and ev.requires_grad) for ev in others):
            continue
        env = {p: inputs[i] for i, p in enumerate(n for n in fwd.graph.nodes if n.op == "placeholder")}
        with gm.graph.inserting_before(node):
            for n in _compute_nodes(fwd):
                env[n] = gm.graph.node_copy(n, lambda a: env[a])
        _replace_function(gm, node, users, env[sm])
        inlined += 1
    return inlined


def _replace_function(gm: GraphModule, node: Node, users: list[Node], result: Node) -> None:
    """Route the Function's output (its `getitem(node, 0)` users) to `result`, then erase the
    node and its body submodules' get_attrs where nothing else reads them."""
    for u in users:
        u.replace_all_uses_with(result)
        gm.graph.erase_node(u)
    bodies = node.args[:2]
    gm.graph.erase_node(node)
    for b in bodies:
        if not b.users:
            gm.graph.erase_node(b)


def _is(n, fn=None, method=None) -> bool:
    return isinstance(n, Node) and ((fn is not None and n.op == "call_function" and n.target is fn)
                                    or (method is not None and n.op == "call_method" and n.target == method))


def _dropout_forward(fwd: GraphModule) -> float | None:
    """p when the forward is exactly `mask = (1 - empty_like(x).bernoulli_(1 - p)).to(bool)`,
    `x.masked_fill(mask, 0) * (1 / (1 - p))`, returning the product and saving the mask."""
    placeholders = [n for n in fwd.graph.nodes if n.op == "placeholder"]
    compute = _compute_nodes(fwd)
    if len(placeholders) != 1 or len(compute) != 6:
        return None
    (x,) = placeholders
    empty, draw, flip, mask, filled, scaled = compute
    keep = draw.args[1] if len(draw.args) == 2 and not draw.kwargs else None
    ok = (_is(empty, fn=torch.empty_like) and empty.args == (x,) and not empty.kwargs
          and _is(draw, method="bernoulli_") and draw.args[0] is empty
          and isinstance(keep, float) and 0.0 < keep < 1.0
          and _is(flip, fn=operator.sub) and flip.args == (1, draw)
          and _is(mask, method="to") and mask.args == (flip, torch.bool) and not mask.kwargs
          and _is(filled, method="masked_fill") and filled.args == (x, mask, 0)
          and _is(scaled, fn=operator.mul) and scaled.args[0] is filled and isinstance(scaled.args[1], float)
          and math.isclose(scaled.args[1], 1.0 / keep, rel_tol=1e-12))
    if not ok:
        return None
    (out,) = [n for n in fwd.graph.nodes if n.op == "output"][0].args
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and tuple(out[0]) == (scaled,) and tuple(out[1]) == (mask,)):
        return None
    return 1.0 - keep


def _dropout_backward(bwd: GraphModule, scale: float) -> bool:
    """Whether the backward is `grad.masked_fill(mask, 0) * scale` with the saved mask."""
    placeholders = [n for n in bwd.graph.nodes if n.op == "placeholder"]
    compute = _compute_nodes(bwd)
    if len(placeholders) != 2 or len(compute) != 2:
        return False
    grad, mask = placeholders
    filled, scaled = compute
    if not (_is(filled, method="masked_fill") and filled.args == (grad, mask, 0)
            and _is(scaled, fn=operator.mul) and scaled.args[0] is filled and isinstance(scaled.args[1], float)
            and math.isclose(scaled.args[1], scale, rel_tol=1e-12)):
        return False
    (out,) = [n for n in bwd.graph.nodes if n.op == "output"][0].args
    return tuple(out) == (scaled,) if isinstance(out, (tuple, list)) else out is scaled


def inline_dropout_functions(gm: GraphModule) -> int:
    """Replace every recognised dropout autograd.Function applied to a softmax's output with
    `F.dropout(x, p, training=True)`; return how many were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        bodies = function_bodies(gm, node)
        if bodies is None or len(node.args) != 3:
            continue
        x = node.args[2]
        if (c := canon(x)) is None or c.op != "softmax":
            continue
        fwd, bwd = bodies
        p = _dropout_forward(fwd)
        if p is None or not _dropout_backward(bwd, 1.0 / (1.0 - p)):
            continue
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue
        with gm.graph.inserting_before(node):
            dropped = gm.graph.call_function(torch.nn.functional.dropout, (x,), {"p": p, "training": True})
        # The node's own example value is the Function's tuple; the dropout's is x's shape.
        dropped.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        if "example_value" in x.meta:
            dropped.meta["example_value"] = x.meta["example_value"]
        _replace_function(gm, node, users, dropped)
        replaced += 1
    return replaced
