"""Biases and masks added to, or filled into, the scores.

- Additive: `scores + attention_mask` (every HF model: 0 / finfo.min masks from the mask
  helpers), `scores + position_bias` (T5, learned), `mask + scores`, `scores - x`. An added
  tensor is a bias whatever its values (-10000, -100, finfo.min, -inf).
- Filled: `scores.masked_fill(mask, -inf)`, `torch.where(keep, scores, finfo.min)` (GPT-2,
  GPT-Neo), `torch.where(mask, mask_value, scores)`. Every fill becomes a keep-mask. A -inf
  fill is then exact (a row with no visible key is NaN in eager, and the rewrite restores that).
  A finite fill of magnitude >= 1e30 (finfo.min of fp32/bf16) is exact on every row with a
  visible key, since exp(fill - row max) underflows to exactly 0 for any score below ~1e29;
  a row with no visible key is a uniform average of V in eager, restored after the op.
  Smaller finite fills (0, -1e4, fp16's -65504) leave masked keys a non-zero weight and are
  refused, but for one spelling whose rows are checked at run time:
- Multiplicative: `s·b + c·(1 − b)` with b a float tensor of 0s and 1s (OpenAI GPT's causal
  mask, c = -1e4): s where b is 1, c where it is 0, a fill of c. The rewrite asserts, in the
  compiled graph, that b holds only 0 and 1 and that every row's scores stay far enough above c
  that exp(c − row max) is exactly 0 (`matcher._emit_op`).
"""

from __future__ import annotations

import math

from torch.fx import Node

from flash_inductor.rewrite.fx import Call, canon, constant_value, example, is_scalar_like

from .steps import Bias, Fill, Refusal

# |fill| at or above this absorbs any score below ~1e22 in fp32 arithmetic (ulp(1e30) ≈ 7e22).
EXACT_FILL_MAGNITUDE = 1e30


def _same_shape(a, b) -> bool:
    ea, eb = example(a), example(b)
    return ea is not None and eb is not None and tuple(ea.shape) == tuple(eb.shape)


def match_bias(call: Call, chain) -> Bias | None:
    if call.op not in ("add", "sub"):
        return None
    if call.get("alpha", 1) != 1:
        raise Refusal("bias_add", f"{call.op} with alpha={call['alpha']!r}")
    if call.op == "sub" and call["a"] is not chain:
        raise Refusal("bias_add", "the scores are subtracted (negated scores are not attention)")
    other = call["b"] if call["a"] is chain else call["a"]
    if not _same_shape(call.node, chain):
        raise Refusal(
            "bias_broadcasts_to_scores",
            f"adding a tensor of shape {tuple(example(other).shape) if example(other) is not None else '?'} "
            f"changes the score shape {tuple(example(chain).shape)}",
        )
    ev = example(other)
    if ev is not None and not (ev.dtype.is_floating_point):
        raise Refusal("bias_add", f"the added tensor has dtype {ev.dtype}, not a float bias")
    return Bias(other, negate=call.op == "sub")


def check_fill_value(value) -> float:
    v = constant_value(value)
    if v is None:
        raise Refusal("fill_is_constant", f"the fill {value!r} is not a constant")
    if v == -math.inf or v <= -EXACT_FILL_MAGNITUDE:
        return v
    raise Refusal(
        "fill_is_exact",
        f"fill value {v:g} is finite and above -1e30: a fully masked row would not match eager exactly",
    )


def match_fill(call: Call, chain) -> Fill | None:
    if call.op == "masked_fill":
        if call["x"] is not chain:
            return None
        return Fill(call["mask"], masked_when=True, value=check_fill_value(call["value"]))
    if call.op == "where":
        if not _same_shape(call.node, chain):
            raise Refusal("bias_broadcasts_to_scores", "torch.where broadcasts the scores to a larger shape")
        if call["a"] is chain:  # where(keep, scores, fill)
            return Fill(call["cond"], masked_when=False, value=check_fill_value(call["b"]))
        if call["b"] is chain:  # where(masked, fill, scores)
            return Fill(call["cond"], masked_when=True, value=check_fill_value(call["a"]))
    return None


def match_zero_one_mask(mul: Call, scores, other) -> Fill | None:
    """`mul` = scores·b and `other` = c·(1 − b) (either order in each product), the two terms of
    an add: the Fill of c where b == 0, or None when the add is not that spelling."""
    if mul.op != "mul":
        return None
    b = mul["b"] if mul["a"] is scores else mul["a"]
    eb = example(b)
    if not isinstance(b, Node) or is_scalar_like(b) or eb is None or not eb.dtype.is_floating_point:
        return None
    term = canon(other)
    if term is None or term.op != "mul":
        return None
    c, rest = (term["a"], term["b"]) if constant_value(term["a"]) is not None else (term["b"], term["a"])
    c, one_minus_b = constant_value(c), canon(rest)
    if c is None or one_minus_b is None or one_minus_b.op != "sub" or one_minus_b.get("alpha", 1) != 1:
        return None
    if constant_value(one_minus_b["a"]) != 1.0 or one_minus_b["b"] is not b:
        return None
    if not (math.isfinite(c) and c < 0):
        raise Refusal("fill_is_exact", f"s·b + c·(1 − b) with c = {c:g}: only a finite negative c is a mask")
    return Fill(b, masked_when=False, value=c, zero_one=True)
