"""The softmax scale, however it is written.

`scores * self.scaling` (LLaMA, BERT in transformers 5), `scores / math.sqrt(d)` (GPT-2),
`scores.div_(scale)` in place, a scale held in a 0-d tensor, no scale at all (T5: its
queries are pre-scaled at initialisation, so the op is called with scale=1), and, on the scores
only, a tensor constant along the keys (Swinv2's per-head `logit_scale` of shape [H, 1, 1]):
s·f = (q·f)·kᵀ exactly when f does not vary with the key, so q absorbs it.
"""

from __future__ import annotations

from flash_inductor.rewrite.fx import Call, example, is_scalar_like

from .steps import Refusal, Scale


def _constant_along_keys(factor, chain) -> bool:
    """A tensor that broadcasts against the scores, no wider than they are, with size 1 in their
    last (key) dim."""
    f, s = example(factor), example(chain)
    return (f is not None and s is not None and 1 <= f.dim() <= s.dim() and f.shape[-1] == 1
            and f.dtype.is_floating_point)


def match_scale(call: Call, chain, per_row_ok: bool = False) -> Scale | None:
    """A Scale step when `call` multiplies or divides the score chain by a scalar (or, with
    `per_row_ok`, by a tensor constant along the keys)."""
    if call.op == "mul":
        other = call["b"] if call["a"] is chain else call["a"]
    elif call.op == "div":
        if call.get("rounding_mode") is not None:
            raise Refusal("scale_is_scalar", f"division with rounding_mode={call['rounding_mode']!r}")
        if call["a"] is not chain:
            raise Refusal("scale_is_scalar", "the scores are the divisor, not the dividend")
        other = call["b"]
    else:
        return None
    if is_scalar_like(other):
        return Scale(other, divide=call.op == "div")
    if per_row_ok and _constant_along_keys(other, chain):
        return Scale(other, divide=call.op == "div", per_row=True)
    raise Refusal(
        "scale_is_scalar",
        "scores are multiplied by a tensor that varies along the keys, not a scalar (a multiplicative "
        "mask is not a bias)",
    )
