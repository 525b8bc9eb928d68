"""`F.scaled_dot_product_attention` calls (HF attn_implementation="sdpa", timm, nanoGPT).

SDPA's contract maps onto the op one to one: a bool attn_mask is a keep-mask (True attends), a
float attn_mask is a bias, `is_causal` is the top-left alignment, `scale` defaults to
1/sqrt(D), `enable_gqa` is native GQA, and `dropout_p` applies whenever it is non-zero. Fully
masked rows return zeros in both.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from flash_inductor.rewrite.fx import Call, example, is_scalar_like

from .dropout import specialised_rate
from .steps import Refusal


@dataclass
class Sdpa:
    q: Node
    k: Node
    v: Node
    mask: Node | None
    causal: bool
    scale: float | Node | None  # a Node holds a symbolic scale
    dropout_p: float
    enable_gqa: bool


def match_sdpa(call: Call) -> Sdpa:
    def const(name, types):
        v = call.get(name)
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise Refusal("sdpa_constant_args", f"{name}={v!r} is not a constant")
        return v

    # a rate Dynamo made symbolic (dynamic=True) is specialised with a guard (patterns/dropout.py)
    dropout_p = specialised_rate(call.get("dropout_p"))
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise Refusal("sdpa_constant_args", f"dropout_p={dropout_p!r} is not a constant")
    dropout_p = float(dropout_p)
    causal = const("is_causal", (bool,))
    enable_gqa = const("enable_gqa", (bool,))
    scale = call.get("scale")
    if isinstance(scale, Node):
        # dynamic=True makes float attributes symbolic (`item` nodes): the rewrite folds such a
        # scale into q, as it does for a tensor-valued scale on the eager path.
        if not is_scalar_like(scale):
            raise Refusal("sdpa_constant_args", f"scale={scale.name} is not a scalar")
    elif scale is not None:
        scale = float(const("scale", (int, float)))
    mask = call.get("attn_mask")
    if mask is not None and causal:
        raise Refusal("sdpa_mask_and_causal", "attn_mask together with is_causal=True (SDPA rejects it)")
    if mask is not None and not isinstance(mask, Node):
        raise Refusal("sdpa_constant_args", "attn_mask is not a tensor")
    for name in ("query", "key", "value"):
        ev = example(call[name])
        if ev is None or ev.dim() != 4:
            raise Refusal("sdpa_4d", f"{name} is not a 4-D [B, H, N, D] tensor")
    return Sdpa(call["query"], call["key"], call["value"], mask, causal, scale, dropout_p, enable_gqa)
