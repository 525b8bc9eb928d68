"""Which dim of an einsum plays which part in attention, whatever the equation's letter order.

An einsum is q·kᵀ when its two operands share exactly one contracted letter (the head dim D),
each brings one letter of its own (Nq, Nk), the scores' last letter is the key's (softmax runs
over it), and every other letter is shared by both operands and kept (batch and heads).
`"bhqd,bhkd->bhqk"`, `"bqhd,bkhd->bhqk"` and LongT5's blocked `"...qhd,...khd->...hqk"` are all
that, up to a permutation of the dims. P·V is the same with the roles (Nq, Nk, Dv): contracted
over the probabilities' last (key) letter.

The roles are returned as permutations into the op's order ([*batch, N, D] for operands,
[*batch, Nq, Nk] for scores), so the rewrite can pass views and never needs the letters again.
The shared letters keep the scores' order: the bias added to the scores is laid out so, and
merging its leading dims is then most often a view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from flash_inductor.rewrite.fx import example

from .steps import Refusal


class NotAttention(Exception):
    """The einsum is some other product; the message says which rule it breaks, for the log."""


@dataclass(frozen=True)
class EinsumLayout:
    """Where an einsum's operands and result keep their dims, as permutations to the op's order."""

    roles: tuple[str, ...]  # per dim of the scores (P·V: of the probabilities): "b" (batch or heads), "q", "k"
    # x.permute(perm) takes each from the first order to the second:
    operand_perms: tuple[tuple[int, ...], ...]  # q, k (scores) or v (values) -> [*batch, N, D]
    result_perm: tuple[int, ...]  # scores -> [*batch, Nq, Nk]; values: [*batch, Nq, Dv] -> the result
    n_batch: int  # shared dims; all but the last merge into the op's batch, the last is its heads

    @property
    def trivial(self) -> bool:
        """Already [B, H, N, D] / [B·H, N, D]: nothing to emit."""
        perms = self.operand_perms + (self.result_perm,)
        return self.n_batch <= 2 and all(p == tuple(range(len(p))) for p in perms)


def terms(node: Node):
    """(input terms, output term, operands), each term a list of letters with "..." expanded into
    one name per broadcast dim (right-aligned, as einsum broadcasts them); None when `node` is not
    an explicit two-operand einsum over tensors with known shapes."""
    eq = node.args[0] if node.args else None
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(eq, str) or "->" not in eq or len(operands) != 2:
        return None
    shapes = [example(x) for x in operands]
    if any(s is None for s in shapes):
        return None
    lhs, out = eq.replace(" ", "").split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        return None
    spans = [s.dim() - len(t.replace("...", "")) for s, t in zip(shapes, ins)]
    width = max([n for n, t in zip(spans, ins) if "..." in t], default=0)

    def expand(term: str, n: int) -> list[str]:
        head, _, tail = term.partition("...")
        dots = [f"...{i}" for i in range(width - n, width)] if "..." in term else []
        return list(head) + dots + list(tail)

    expanded = [expand(t, n) for t, n in zip(ins, spans)]
    return expanded, expand(out, width), tuple(operands)


def _check_sizes(letters, a: list[str], b: list[str], ea, eb, guard: str) -> None:
    """Shared letters must have one size: einsum would broadcast a size-1 dim, which the op,
    reading q, k and v as they are, would not."""
    for x in letters:
        sa, sb = ea.shape[a.index(x)], eb.shape[b.index(x)]
        if not statically_known_true(sa == sb):
            raise Refusal(guard, f"the einsum broadcasts dim {x!r} ({sa} against {sb}); "
                                 "expand that operand before the einsum")


def _roles(a: list[str], b: list[str], out: list[str], own_b: str):
    """The letters' parts in a product of a and b whose result keeps `own_b`, b's letter:
    (the letters both operands share and keep, in the result's order; a's own kept letter;
    the contracted letter). NotAttention when the product has any other shape."""
    for t in (a, b, out):
        if len(set(t)) != len(t):
            raise NotAttention(f"a repeated letter in {''.join(t)!r} (a diagonal, not a product)")
    contracted = [x for x in a if x in b and x not in out]
    if len(contracted) != 1:
        raise NotAttention(f"it contracts {len(contracted)} letters ({', '.join(contracted) or 'none'}); "
                           "attention contracts exactly one")
    summed = [x for x in a + b if x not in out and x not in contracted]
    if summed:
        raise NotAttention(f"it sums {summed[0]!r} over one operand only")
    kept_a = [x for x in out if x in a and x not in b]
    kept_b = [x for x in out if x in b and x not in a]
    if kept_b != [own_b] or len(kept_a) != 1:
        raise NotAttention(f"each operand must keep exactly one letter of its own (they keep "
                           f"{''.join(kept_a) or 'none'} and {''.join(kept_b) or 'none'})")
    shared = [x for x in out if x in a and x in b]
    if not shared:
        raise NotAttention("no batch or head letter (2-D attention)")
    return shared, kept_a[0], contracted[0]


def _perm(term: list[str], order: list[str]) -> tuple[int, ...]:
    return tuple(term.index(x) for x in order)


def score_layout(node: Node) -> tuple[EinsumLayout, Node, Node] | None:
    """(layout, q, k) when the einsum is q·kᵀ with the keys' letter last; None for an einsum that
    is not an explicit product of two tensors; NotAttention for one that is not q·kᵀ."""
    t = terms(node)
    if t is None:
        return None
    (a, b), out, (x, y) = t
    if not out:
        raise NotAttention("it returns a scalar")
    key = out[-1]  # the softmax runs over the last dim: whichever operand holds it is K
    if key in a and key in b:
        raise NotAttention(f"the scores' last letter {key!r}, which the softmax runs over, is in both operands")
    if key in a and key not in b:  # einsum(k, q)
        a, b, x, y = b, a, y, x
    shared, q, d = _roles(a, b, out, key)
    _check_sizes(shared + [d], a, b, example(x), example(y), "score_operands")
    roles = tuple("b" if c in shared else "q" if c == q else "k" for c in out)
    layout = EinsumLayout(roles, (_perm(a, shared + [q, d]), _perm(b, shared + [key, d])),
                          _perm(out, shared + [q, key]), len(shared))
    return layout, x, y


def value_layout(node: Node, probs: Node) -> tuple[EinsumLayout, Node] | None:
    """(layout, v) when the einsum is probs·V contracted over the probabilities' last (key)
    letter; None when `probs` is not exactly one of two explicit operands; NotAttention when
    the product is something else."""
    t = terms(node)
    if t is None:
        return None
    (a, b), out, (x, y) = t
    if y is probs and x is not probs:  # einsum(v, p)
        a, b, x, y = b, a, y, x
    if x is not probs or y is probs:
        return None
    dv = [c for c in b if c not in a]
    if len(dv) != 1:
        raise NotAttention(f"V must bring exactly one letter of its own (the value head dim), it brings {len(dv)}")
    shared, q, k = _roles(a, b, out, dv[0])
    if k != a[-1]:
        raise NotAttention(f"it contracts {k!r}, not the probabilities' last (key) letter {a[-1]!r}")
    batch = [c for c in a if c in shared]  # the probabilities' order, which is the scores'
    _check_sizes(batch + [k], a, b, example(x), example(y), "value_operands")
    roles = tuple("b" if c in shared else "q" if c == q else "k" for c in a)
    return EinsumLayout(roles, (_perm(b, batch + [k, dv[0]]),), _perm(batch + [q, dv[0]], out), len(batch)), y


def matmul_layout(n_batch: int) -> EinsumLayout:
    """A matmul's: operands [*batch, N, D], scores [*batch, Nq, Nk], output [*batch, Nq, Dv]; to
    pair with an einsum on the other product."""
    same = tuple(range(n_batch + 2))
    return EinsumLayout(("b",) * n_batch + ("q", "k"), (same, same), same, n_batch)


def is_einsum(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in (torch.einsum, torch.functional.einsum)
