"""The PyTorch reference as a backend: any device, any dtype, every feature; the last resort."""

from __future__ import annotations

import torch

from .. import reference
from ..inputs import AttentionInputs
from .base import KernelBackend


class ReferenceBackend(KernelBackend):
    NAME = "reference"
    DEVICE_TYPES = ("cpu", "cuda", "meta", "mps", "xpu")
    SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    SUPPORTS_VARLEN = True  # sequence by sequence, in flash_inductor/varlen.py

    def forward(self, inp: AttentionInputs, seed):
        return reference.forward(inp, seed)

    def backward(self, inp, seed, out, lse, dout, dlse, bias_requires_grad):
        return reference.backward(inp, seed, out, lse, dout, dlse, bias_requires_grad)
