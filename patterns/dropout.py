"""Dropout on the attention probabilities.

`nn.functional.dropout(p, p=self.dropout, training=self.training)` (HF eager attention),
`self.dropout(p)` (nn.Dropout, inlined by Dynamo), `torch.dropout(p, rate, train)`. Only live
dropout (training and p > 0, both constants at trace time, or a rate Dynamo made symbolic that is
specialised with a guard) is carried into the op; otherwise it is the identity and is dropped.
"""

from __future__ import annotations

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from flash_inductor.rewrite.fx import Call

from .steps import Refusal


def specialised_rate(p):
    """A symbolic rate (a module's float attribute under `dynamic=True`, which Dynamo passes in
    as a tensor and reads with .item()) as the number it is now. float() on the traced SymFloat
    records a guard in Dynamo's shape environment, so a changed rate recompiles instead of
    running the old one; a rate without a value to read (data-dependent) stays refused."""
    ev = p.meta.get("example_value") if isinstance(p, Node) else None
    if not isinstance(ev, torch.SymFloat):
        return p
    try:
        return float(ev)
    except GuardOnDataDependentSymNode:  # an unbacked symbol: no value at compile time, no guard
        return p


def live_rate(call: Call) -> float:
    """The dropout probability the op must apply (0.0 when this dropout is inactive)."""
    training = call.get("training")
    if not isinstance(training, bool):
        raise Refusal("dropout_constant", f"dropout training flag {training!r} is not a constant")
    if not training:  # the identity, whatever the rate: nothing to specialise
        return 0.0
    p = specialised_rate(call.get("p"))
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        raise Refusal("dropout_constant", f"dropout rate {p!r} is not a constant")
    if p == 0:
        return 0.0
    if not 0.0 < p < 1.0:
        raise Refusal("dropout_constant", f"dropout rate {p} is outside (0, 1)")
    return float(p)
