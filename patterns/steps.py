"""The normalised steps the families produce, and the refusal they raise instead."""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node


class Refusal(Exception):
    """A guard refused the site; the message says which guard and why, for the log."""

    def __init__(self, guard: str, reason: str):
        super().__init__(f"{guard}: {reason}")
        self.guard = guard
        self.reason = reason


@dataclass
class Scale:
    """Scores multiplied (or divided) by `factor`: a number, or a node holding a scalar; with
    `per_row`, a tensor constant along the keys (size 1 in the scores' last dim: Swinv2's
    per-head logit scale), which only q can absorb."""

    factor: object
    divide: bool = False
    per_row: bool = False


@dataclass
class Bias:
    """`term` (a node or number) added to the scores; `negate` for subtraction."""

    term: object
    negate: bool = False


@dataclass
class Fill:
    """Scores replaced by `value` where `mask` is `masked_when` (masked_fill / where)."""

    mask: Node
    masked_when: bool
    value: float
    # `mask` is a float tensor of 0s and 1s that multiplied the scores (OpenAI GPT's
    # `s·b + c·(1 − b)`): masked where it is 0. Its values, and a `value` of small magnitude,
    # are checked at run time (`masks.match_zero_one_mask`).
    zero_one: bool = False


@dataclass
class Cast:
    """A dtype change on the scores; rounding only, so the op needs nothing from it."""




@dataclass
class Tanh:
    """tanh of the scores: with the scales around it, logit soft-capping c·tanh(s / c)."""


@dataclass
class ClampMin:
    """Scores raised to at least `floor` (XGLM's `torch.max(s, finfo.min)` after its mask), in
    `dtype`, the scores' dtype there."""

    floor: float
    dtype: object = None


@dataclass
class MergeHeads:
    """4-D [B, H, Nq, Nk] scores viewed back as 3-D [B·H, Nq, Nk] before the softmax."""


@dataclass
class SplitHeads:
    """3-D [B·H, Nq, Nk] scores viewed as 4-D [B, H, Nq, Nk]; `batch`/`heads` are graph values."""

    batch: object
    heads: object


@dataclass
class SplitBatch:
    """4-D [A·W, H, Nq, Nk] scores viewed as 5-D [A, W, H, Nq, Nk] to add a bias over one of the
    two batch factors (Swin V2's per-window shift mask [W, Nq, Nk]); `outer`, `inner` are A, W."""

    outer: object
    inner: object


@dataclass
class MergeBatch:
    """5-D [A, W, H, Nq, Nk] scores viewed back as 4-D [A·W, H, Nq, Nk]."""


Step = Scale | Bias | Fill | Cast | Tanh | ClampMin | MergeHeads | SplitHeads | SplitBatch | MergeBatch
