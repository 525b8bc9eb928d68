"""The two products of attention: scores q·kᵀ and output P·V.

Score spellings: `torch.matmul(q, k.transpose(2, 3))` (HF eager attention), `q @ k.transpose(-1, -2)`,
`torch.bmm(q, k.transpose(1, 2))` on 3-D [B·H, N, D] layouts (BART, Whisper, older OPT),
`torch.einsum("bhqd,bhkd->bhqk", q, k)` (GPT-J style code), and
`torch.baddbmm(alibi, q, kᵀ, beta=1, alpha=1/sqrt(d))` (BLOOM's ALiBi, bias and scale fused).
The key operand must be a transpose or permute of K: `q @ k` with an untransposed k is a plain
product, not an attention score, and is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from flash_inductor.rewrite.fx import Call, canon, example

from .steps import Bias, Refusal, Scale, Step


@dataclass
class Scores:
    q: Node
    # Either `k` ([.., Nk, D]) is known, or `key_t` ([.., D, Nk]) must be transposed back.
    k: Node | None
    key_t: Node | None
    spelling: str
    steps: list[Step] = field(default_factory=list)  # applied to q·kᵀ before anything else


def _untranspose(b: Node) -> tuple[Node | None, Node | None]:
    """(k, None) when b is k.transpose(-1, -2); (None, b) for any other [.., D, Nk] operand.

    q·X is q·kᵀ with k = Xᵀ whatever X is, so a key that arrives already transposed (SqueezeBERT
    views its conv output straight to [B, H, D, N]) is exact to rewrite: the op gets the view
    X.transpose(-1, -2) and reads it through its strides.
    """
    c = canon(b)
    ev = example(b)
    if ev is None:
        raise Refusal("key_is_transposed", "the second score operand has no recorded shape")
    if c is None or c.op not in ("transpose", "permute"):
        return None, b
    n = ev.dim()
    if c.op == "transpose":
        dims = {c["dim0"] % n, c["dim1"] % n} if isinstance(c["dim0"], int) and isinstance(c["dim1"], int) else None
        if dims == {n - 2, n - 1}:
            return c["x"], None
    return None, b


def _scaled_key(b: Node) -> tuple[Node, list[Step]]:
    """DeBERTa divides kᵀ by a 0-d scale tensor before the product: that is a score scale."""
    from .scale import match_scale

    c = canon(b)
    if c is None or c.op not in ("mul", "div"):
        return b, []
    for side in ("a", "b") if c.op == "mul" else ("a",):
        inner = canon(c[side])
        if inner is not None and inner.op in ("transpose", "permute"):
            return c[side], [match_scale(c, c[side])]
    return b, []


def _einsum_terms(node: Node):
    eq = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(eq, str) or "->" not in eq or "..." in eq or len(operands) != 2:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    return terms[0], terms[1], out, operands


def is_einsum(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in (torch.einsum, torch.functional.einsum)


def match_scores(node: Node) -> Scores | None:
    """Scores if `node` computes q·kᵀ (possibly with baddbmm's bias and scale); else None."""
    if is_einsum(node):
        t = _einsum_terms(node)
        if t is None:
            return None
        a, b, out, (q, k) = t
        # "bhqd,bhkd->bhqk": shared batch letters, contraction over the last letter of both.
        if len(a) == len(b) == len(out) and a[:-2] == b[:-2] == out[:-2] and a[-1] == b[-1] \
                and out[-2:] == a[-2] + b[-2] and a[-1] not in out and a[-2] != b[-2]:
            return Scores(q, k, None, "einsum")
        return None
    c = canon(node)
    if c is None:
        return None
    if c.op == "matmul":
        ev = example(node)
        if ev is None or ev.dim() < 3:
            return None
        key_operand, steps = _scaled_key(c["b"])
        k, key_t = _untranspose(key_operand)
        return Scores(c["a"], k, key_t, c.spelling, steps)
    if c.op == "baddbmm":
        k, key_t = _untranspose(c["b"])
        steps: list[Step] = []
        alpha, beta = c.get("alpha", 1), c.get("beta", 1)
        if alpha != 1:
            steps.append(Scale(alpha))
        if beta != 0:
            if beta != 1:
                raise Refusal("baddbmm_beta", f"baddbmm beta={beta!r} (the bias is added with beta=1 or 0 only)")
            steps.append(Bias(c["input"]))
        return Scores(c["a"], k, key_t, "baddbmm", steps)
    return None


def match_values(node: Node, probs: Node) -> Node | None:
    """V when `node` computes probs·V, else None."""
    if is_einsum(node):
        t = _einsum_terms(node)
        if t is None:
            return None
        a, b, out, (p, v) = t
        if p is probs and len(a) == len(b) == len(out) and a[:-2] == b[:-2] == out[:-2] \
                and a[-1] == b[-2] and out[-2:] == a[-2] + b[-1]:
            return v
        return None
    c = canon(node)
    if c is not None and c.op == "matmul" and c["a"] is probs and c["b"] is not probs:
        return c["b"]
    return None
