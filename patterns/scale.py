"""The softmax scale, however it is written.

`scores * self.scaling` (LLaMA, BERT in transformers 5), `scores / math.sqrt(d)` (GPT-2),
`scores.div_(scale)` in place, a scale held in a 0-d tensor, and no scale at all (T5: its
queries are pre-scaled at initialisation, so the op is called with scale=1).
"""

from __future__ import annotations

from flash_inductor.rewrite.fx import Call, is_scalar_like

from .steps import Refusal, Scale


def match_scale(call: Call, chain) -> Scale | None:
    """A Scale step when `call` multiplies or divides the score chain by a scalar."""
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
    if not is_scalar_like(other):
        raise Refusal(
            "scale_is_scalar",
            "scores are multiplied by a tensor, not a scalar (a multiplicative mask is not a bias)",
        )
    return Scale(other, divide=call.op == "div")
