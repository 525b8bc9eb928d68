"""PyTorch's own fused CPU FlashAttention kernel as a backend (`aten::_scaled_dot_product_flash_attention_for_cpu`).

Why: on a CPU the reference (flash_inductor.reference) is a readable ground truth, not a fast
kernel: for BERT-size attention it runs about 5× slower than eager PyTorch (4.1 vs 0.8 ms,
B=2 H=12 N=128 D=64 on this project's 2-core CI machine; benchmarks/cpu_attention.py), so
`backend="flash"` made CPU models
slower. PyTorch ships a tiled, O(N)-memory CPU kernel with forward and backward; this backend
adapts our contract to it:

* bool keep-masks become additive 0/-inf masks; a float bias is passed with its entries
  <= MASKED_BIAS set to -inf (the kernel needs it in q's dtype: a wider bias is refused rather
  than rounded);
* GQA/MQA: K/V heads are repeated for the kernel and their gradients summed back;
* fully masked rows: the kernel returns zeros but lse = 0; they are found from the mask and
  given lse = -inf, as every other backend returns them;
* the kernel's backward has no bias gradient and no lse gradient: when either is needed, the
  backward is the reference's (exact, the same math, from the same out and lse). Dispatch stays
  a pure function of the forward's inputs, as docs/design.md §4 requires.

Refused (dispatch falls through to the reference): dropout (the kernel has none), bottom-right
causal with Nq != Nk, a v head dim unlike q's, soft-capping, non-CPU devices.
"""

from __future__ import annotations

import torch

from .. import reference
from ..inputs import AttentionInputs, Causal, accumulation_dtype, additive_mask
from ..inputs import unit_last_dim as _unit_last  # the CPU kernel silently misreads a strided last dim
from .base import KernelBackend, repeat_kv

_FORWARD = "_scaled_dot_product_flash_attention_for_cpu"
_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"


def _available() -> bool:
    return hasattr(torch.ops.aten, _FORWARD) and hasattr(torch.ops.aten, _BACKWARD)


def _is_causal(inp: AttentionInputs) -> bool:
    return inp.causal != Causal.NONE


def _mask(inp: AttentionInputs):
    """(additive mask in q's dtype or None, bool [B|1, H|1, Nq, 1] of rows with no visible key or None)."""
    b = inp.bias_4d()
    if b is None:
        return None, None
    mask, masked = additive_mask(b, inp.dtype)
    return mask, masked.all(-1, keepdim=True)



class AtenCpuBackend(KernelBackend):
    NAME = "aten_cpu"
    DEVICE_TYPES = ("cpu",)
    SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    SUPPORTS_DROPOUT = False
    SUPPORTS_SOFTCAP = False
    SUPPORTS_DIFFERENT_V_DIM = False
    SUPPORTED_CAUSAL = (Causal.NONE, Causal.TOP_LEFT, Causal.BOTTOM_RIGHT)

    def unavailable_reasons(self, device):
        if not _available():
            return [f"this torch has no aten::{_FORWARD}"]
        return []

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        reasons = []
        if inp.causal == Causal.BOTTOM_RIGHT and inp.len_q != inp.len_k:
            reasons.append("bottom_right causal with len_q != len_k (the CPU kernel aligns top-left)")
        b = inp.bias
        if b is not None and b.dtype != torch.bool and b.dtype != inp.dtype:
            if torch.finfo(b.dtype).bits > torch.finfo(inp.dtype).bits:
                reasons.append(f"a {b.dtype} bias with {inp.dtype} q (the CPU kernel takes the mask in q's dtype)")
        return reasons

    def forward(self, inp: AttentionInputs, seed):
        B, Hq, Nq, Nk = inp.batch, inp.heads_q, inp.len_q, inp.len_k
        if B * Hq * Nq == 0 or Nk == 0:
            return reference.forward(inp, seed)  # empty shapes: the reference's zeros and -inf
        groups = Hq // inp.heads_kv
        mask, empty = _mask(inp)
        q, k, v = (_unit_last(t) for t in (inp.q, repeat_kv(inp.k, groups), repeat_kv(inp.v, groups)))
        out, lse = getattr(torch.ops.aten, _FORWARD)(
            q, k, v, 0.0, _is_causal(inp), attn_mask=_unit_last(mask), scale=inp.scale,
        )
        lse = lse.to(accumulation_dtype(inp.dtype))
        if empty is not None:
            lse = lse.masked_fill(empty.squeeze(-1).expand(B, Hq, Nq), float("-inf"))
        return out, lse

    def backward(self, inp, seed, out, lse, dout, dlse, bias_requires_grad):
        B, Hq, Nq, Nk = inp.batch, inp.heads_q, inp.len_q, inp.len_k
        if bias_requires_grad or dlse is not None or B * Hq * Nq == 0 or Nk == 0:
            return reference.backward(inp, seed, out, lse, dout, dlse, bias_requires_grad)
        groups = Hq // inp.heads_kv
        mask, _ = _mask(inp)
        # Fully masked rows carry lse = -inf here; the kernel expects its own 0 there (p = 0 either way).
        lse_k = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        q, k, v = (_unit_last(t) for t in (inp.q, repeat_kv(inp.k, groups), repeat_kv(inp.v, groups)))
        dq, dk, dv = getattr(torch.ops.aten, _BACKWARD)(
            dout.contiguous(), q, k, v, _unit_last(out), lse_k,
            0.0, _is_causal(inp), attn_mask=_unit_last(mask), scale=inp.scale,
        )
        if groups > 1:
            dk = dk.unflatten(1, (inp.heads_kv, groups)).sum(2)
            dv = dv.unflatten(1, (inp.heads_kv, groups)).sum(2)
        return dq, dk, dv, None
