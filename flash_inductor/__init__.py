"""flash-inductor: `torch.compile(model, backend="flash")` runs attention as one fused op."""

from .dispatch import config
from .inputs import Causal
from .ops import attention, attention_with_lse
from .reference import attention_ref

__all__ = ["attention", "attention_with_lse", "attention_ref", "Causal", "config"]
__version__ = "0.1.0"
