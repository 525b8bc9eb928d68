"""flash-inductor: `torch.compile(model, backend="flash")` runs attention as one fused op."""

from .dispatch import config
from .explain import explain
from .inputs import Causal
from .ops import attention, attention_with_lse
from .seed_compat import FlashAttentionFunction
from .varlen import attention_varlen
from .reference import attention_ref

__all__ = ["FlashAttentionFunction", "explain", "attention", "attention_varlen", "attention_with_lse", "attention_ref",
           "Causal", "config"]
__version__ = "0.1.0"
