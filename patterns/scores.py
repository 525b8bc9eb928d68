"""The two products of attention: scores q·kᵀ and output P·V.

Score spellings: `torch.matmul(q, k.transpose(2, 3))` (HF eager attention), `q @ k.transpose(-1, -2)`,
`torch.bmm(q, k.transpose(1, 2))` on 3-D [B·H, N, D] layouts (BART, Whisper, older OPT),
`torch.einsum("bhqd,bhkd->bhqk", q, k)` (GPT-J style code) or any other einsum that is q·kᵀ up to
a permutation of its dims (LongT5's blocked `"...qhd,...khd->...hqk"`: `patterns/einsum.py`), and
`torch.baddbmm(alibi, q, kᵀ, beta=1, alpha=1/sqrt(d))` (BLOOM's ALiBi, bias and scale fused).
The key operand must be a transpose or permute of K: `q @ k` with an untransposed k is a plain
product, not an attention score, and is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import Node

from flash_inductor.rewrite.fx import Call, canon, example

from .einsum import EinsumLayout, NotAttention, is_einsum, score_layout, value_layout
from .steps import Bias, Refusal, Scale, Step


@dataclass
class Scores:
    q: Node
    # Either `k` ([.., Nk, D]) is known, or `key_t` ([.., D, Nk]) must be transposed back.
    k: Node | None
    key_t: Node | None
    spelling: str
    steps: list[Step] = field(default_factory=list)  # applied to q·kᵀ before anything else
    # An einsum's dims in their own order (None: q and k are [.., N, D] and the scores [.., Nq, Nk]).
    layout: EinsumLayout | None = None


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


def match_scores(node: Node) -> Scores | None:
    """Scores if `node` computes q·kᵀ (possibly with baddbmm's bias and scale); else None."""
    if is_einsum(node):
        try:
            found = score_layout(node)
        except NotAttention:  # some other product: not a score, so not where a chain ends
            return None
        if found is None:
            return None
        layout, q, k = found
        return Scores(q, k, None, "einsum", layout=layout)
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


def match_values(node: Node, probs: Node) -> tuple[Node, EinsumLayout | None] | None:
    """(V, the einsum's layout or None) when `node` computes probs·V, else None."""
    if is_einsum(node):
        try:
            found = value_layout(node, probs)
        except NotAttention:
            return None
        return None if found is None else (found[1], found[0])
    c = canon(node)
    if c is not None and c.op == "matmul" and c["a"] is probs and c["b"] is not probs:
        return c["b"], None
    return None


def why_not_attention(node: Node, probs: Node | None = None) -> str | None:
    """Why an einsum of two operands is not q·kᵀ (given `probs`: not probs·V), for the refusal;
    None for anything else."""
    if not is_einsum(node):
        return None
    try:
        score_layout(node) if probs is None else value_layout(node, probs)
    except NotAttention as e:
        return f"einsum {node.args[0]!r} is not {'q·kᵀ' if probs is None else 'P·V'}: {e}"
    return None
