"""Multi-head attention as one call: `F.multi_head_attention_forward`.

`nn.MultiheadAttention` (in training and inference alike: under Dynamo its native fast path is
blocked by tracing) and WavLM call it, and Dynamo keeps the call as one node: no softmax is
seen. torch's function (torch/nn/functional.py, 2.13), which the rewrite reproduces step by step:

- in-projection: `in_proj_weight` [3E, E] chunked into q, k, v (one linear when query, key and
  value are one tensor), or `q_proj_weight`/`k_proj_weight`/`v_proj_weight` when
  `use_separate_proj_weight`; `in_proj_bias` [3E] chunked likewise;
- heads: [L, B, E] viewed as [L, B·H, D] (batch-major: row b·H + h), scale 1/sqrt(D);
- masks: a bool mask means True = masked (SDPA's opposite) and becomes 0/-inf; an `attn_mask` is
  [L, S] (shared by the batch) or [B·H, L, S]; `key_padding_mask` [B, S] is added to it;
- `is_causal` replaces `attn_mask` by SDPA's causal flag only without a key_padding_mask and with
  need_weights=False; otherwise `attn_mask` is used as given;
- need_weights=True: baddbmm, softmax (a row with every key masked is NaN), dropout, bmm;
  need_weights=False: SDPA (zeros on such a row);
- dropout on the probabilities when `training` and dropout_p > 0; then the out-projection.

torch's fused native calls (`torch._transformer_encoder_layer_fwd`, what nn.TransformerEncoderLayer
runs in inference without grad; `torch._native_multi_head_attention`) are sites too, left to
their own kernels.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Node

from flash_inductor.rewrite.fx import example

from .dropout import specialised_rate
from .steps import Refusal

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
# One node holding a whole layer or torch's own fused attention: counted, never rewritten.
_FUSED_NATIVE = {
    torch._transformer_encoder_layer_fwd: "nn.TransformerEncoderLayer's fused inference path (attention, "
                                          "feed-forward and norms in one native call)",
    torch._native_multi_head_attention: "torch's fused native multi-head attention",
}


def is_one_call_attention(node: Node) -> bool:
    """A node that computes a whole multi-head attention (or a layer holding one) by itself."""
    if node.op != "call_function":
        return False
    return node.target is F.multi_head_attention_forward or node.target in _FUSED_NATIVE


@dataclass
class Mha:
    query: Node  # [L, B, E], or [L, E] unbatched
    key: Node
    value: Node
    num_heads: int
    head_dim: int
    in_proj: tuple  # (q, k, v) weights, or (packed [3E, E],) when not use_separate_proj_weight
    in_proj_bias: Node | None
    out_proj_weight: Node
    out_proj_bias: Node | None
    key_padding_mask: Node | None  # [B, S], bool (True = masked) or float (added)
    attn_mask: Node | None  # [L, S] or [B·H, L, S], bool (True = masked) or float; None when causal
    causal: bool  # SDPA's top-left causal flag in place of attn_mask
    need_weights: bool
    dropout_p: float  # 0 unless training; the op's contract refuses p outside [0, 1)
    batched: bool
    given_masks: tuple  # (attn_mask, key_padding_mask) as the call got them, the ignored one included


def match_mha(node: Node) -> Mha:
    """The call's arguments, bound by name, with torch's own decisions (causal, dropout) taken."""
    if node.target in _FUSED_NATIVE:
        raise Refusal("fused_native_call", f"{_FUSED_NATIVE[node.target]} is left to torch's kernels")
    try:
        args = _SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError as e:
        raise Refusal("mha_inputs", f"the call's arguments do not bind to torch's signature ({e})")
    args.apply_defaults()
    a = args.arguments

    def const(name, types, why=""):
        v = a[name]
        if isinstance(v, Node) or not isinstance(v, types):
            raise Refusal("mha_constant_args", f"{name}={getattr(v, 'name', v)!r} is not a constant{why}")
        return v

    num_heads = const("num_heads", (int,))
    embed_dim = const("embed_dim_to_check", (int,))
    need_weights = const("need_weights", (bool,))
    is_causal = const("is_causal", (bool,))
    separate = const("use_separate_proj_weight", (bool,))
    training = const("training", (bool,))
    # Under dynamic=True a float attribute such as the module's dropout rate reaches the graph as
    # a symbol (an `item` node): specialised with a guard where it has a value, as for any site.
    if training:
        a["dropout_p"] = specialised_rate(a["dropout_p"])
    dropout_p = float(const("dropout_p", (int, float))) if training else 0.0
    if a["bias_k"] is not None or a["bias_v"] is not None:
        raise Refusal("mha_extra_keys", "add_bias_kv (bias_k/bias_v) appends a learned key and value to every "
                                        "sequence; the rewrite does not model the extra key")
    if const("add_zero_attn", (bool,)):
        raise Refusal("mha_extra_keys", "add_zero_attn appends a zero key and value to every sequence; the "
                                        "rewrite does not model the extra key")
    if a["static_k"] is not None or a["static_v"] is not None:
        raise Refusal("mha_static_kv", "static_k/static_v replace the projected keys and values")
    query = example(a["query"])
    if query is None or query.dim() not in (2, 3) or not query.is_floating_point():
        raise Refusal("mha_inputs", "query is not a 2-D or 3-D floating-point tensor")
    in_proj = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]) if separate else (a["in_proj_weight"],)
    if not all(isinstance(w, Node) for w in in_proj):
        raise Refusal("mha_inputs", "an in-projection weight is not a tensor")
    kpm, attn_mask = a["key_padding_mask"], a["attn_mask"]
    causal = is_causal and kpm is None and not need_weights
    return Mha(a["query"], a["key"], a["value"], num_heads, embed_dim // num_heads, in_proj, a["in_proj_bias"],
               a["out_proj_weight"], a["out_proj_bias"], kpm, None if causal else attn_mask, causal, need_weights,
               dropout_p, query.dim() == 3, (attn_mask, kpm))


@dataclass
class MaskedPositions:
    """A mask that holds only 0 and -inf (or is bool): `masked` is True where it masks.
    `canonical` holds torch's `zeros_like(m, dtype=float).masked_fill_(m, -inf)` nodes that made
    the float form (nn.MultiheadAttention runs that before the call), else ()."""

    masked: Node
    canonical: tuple = ()


def masked_positions(mask: Node) -> MaskedPositions | None:
    """What a key_padding_mask or attn_mask masks, when that is all it does (no values to add)."""
    ev = example(mask)
    if ev is not None and ev.dtype == torch.bool:
        return MaskedPositions(mask)
    if not (mask.op == "call_method" and mask.target == "masked_fill_" and len(mask.args) == 3):
        return None
    zeros, bool_mask, value = mask.args
    is_zeros = (isinstance(zeros, Node) and zeros.op == "call_function" and zeros.target is torch.zeros_like
                and zeros.args and zeros.args[0] is bool_mask)
    bool_ev = example(bool_mask)
    if not is_zeros or value != -math.inf or bool_ev is None or bool_ev.dtype != torch.bool:
        return None
    return MaskedPositions(bool_mask, (zeros, mask))
