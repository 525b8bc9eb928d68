"""The Triton FlashAttention kernels as a backend (flash_inductor/kernels/triton_attention.py)."""

from __future__ import annotations

import functools
import os

import torch

from ..inputs import AttentionInputs
from .base import KernelBackend


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"{type(e).__name__}: {e}"
    return None


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs the kernels on CPU tensors (slowly): how CI tests them."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(KernelBackend):
    NAME = "triton"
    DEVICE_TYPES = ("cuda",)
    # bf16 tensor-core dots need Ampere; older GPUs get the reference.
    MIN_COMPUTE_CAPABILITY = (8, 0)
    # float32 runs with exact-float32 ("ieee") dots: correct, several times slower than bf16.
    SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    SUPPORTED_HEAD_DIMS = (1, 256)
    SUPPORTS_VARLEN = True

    def device_reasons(self, device):
        if device.type == "cpu" and interpreting():
            return []
        reasons = super().device_reasons(device)
        if device.type == "cpu":
            reasons = [reasons[0] + "; on CPU only under TRITON_INTERPRET=1, for tests"]
        return reasons

    def unavailable_reasons(self, device):
        err = _triton_import_error()
        if err:
            return [f"triton is not importable ({err}); HINT: pip install triton"]
        return []

    def forward(self, inp: AttentionInputs, seed):
        from ..kernels import triton_attention

        return triton_attention.forward(inp, seed)

    def backward(self, inp, seed, out, lse, dout, dlse, bias_requires_grad):
        from ..kernels import triton_attention

        return triton_attention.backward(inp, seed, out, lse, dout, dlse, bias_requires_grad)

    def forward_varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed, softcap=0.0):
        from ..kernels import triton_attention

        return triton_attention.forward_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed,
                                               softcap)

    def backward_varlen(self, dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, seed, out, lse, causal, scale,
                        dropout_p, softcap=0.0):
        from ..kernels import triton_attention

        return triton_attention.backward_varlen(dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, seed, out, lse,
                                                causal, scale, dropout_p, softcap)
