"""Grouped-query attention: K/V heads repeated to match the query heads, absorbed by the op.

`repeat_kv` in LLaMA, Mistral, Qwen2, Gemma (transformers)::

    hidden[:, :, None, :, :].expand(b, kv_heads, n_rep, s, d).reshape(b, kv_heads * n_rep, s, d)

and `torch.repeat_interleave(x, n_rep, dim=1)`. The op reads query head h from KV head
h // n_rep, which is exactly this repetition, so the rewrite passes the unrepeated K/V.
"""

from __future__ import annotations

from torch.fx import Node

from flash_inductor.rewrite.fx import canon, example


def unrepeated(node: Node) -> tuple[Node, int]:
    """(source, n_rep) when `node` repeats the heads (dim 1) of a 4-D source; else (node, 1)."""
    c = canon(node)
    ev = example(node)
    if c is None or ev is None or ev.dim() != 4:
        return node, 1
    if c.op == "repeat_interleave":
        src = example(c["x"])
        if isinstance(c["repeats"], int) and c["dim"] == 1 and src is not None and src.dim() == 4:
            return c["x"], c["repeats"]
        return node, 1
    if c.op != "reshape":
        return node, 1
    e = canon(c["x"])
    if e is None or e.op != "expand":
        return node, 1
    e_ev = example(e.node)
    u = canon(e["x"])
    if e_ev is None or e_ev.dim() != 5 or u is None:
        return node, 1
    src = None
    if u.op == "getitem":  # x[:, :, None, :, :]
        idx = u["index"]
        if isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None and all(
            isinstance(i, slice) and i == slice(None) for i in idx[:2] + idx[3:]
        ):
            src = u["x"]
    elif u.op == "unsqueeze" and u["dim"] == 2:
        src = u["x"]
    s_ev = example(src)
    if src is None or s_ev is None or s_ev.dim() != 4:
        return node, 1
    b, hkv, n_rep, s, d = e_ev.shape
    if tuple(s_ev.shape) != (b, hkv, s, d) or tuple(ev.shape) != (b, hkv * n_rep, s, d):
        return node, 1
    return src, int(n_rep)
