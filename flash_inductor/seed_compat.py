"""`FlashAttentionFunction.apply(Q, K, V)`, as the seed project's README used it.

The seed exposed an autograd Function taking [B, H, N, D] tensors with optional bias, causal
flag, softmax scale and dropout, positionally. It now runs the registered ops with their
context handling, so seed users get the same kernels and dispatch as `flash_inductor.attention`.
"""

from __future__ import annotations

import torch

from . import ops
from .inputs import validate


class FlashAttentionFunction(torch.autograd.Function):
    """out = FlashAttentionFunction.apply(q, k, v, bias=None, causal=False, softmax_scale=None, dropout_p=0.0)"""

    @staticmethod
    def forward(ctx, q, k, v, bias=None, causal=False, softmax_scale=None, dropout_p=0.0):
        inp = validate(q, k, v, bias, causal=causal, scale=softmax_scale, dropout_p=dropout_p)
        args = (q, k, v, bias, None, int(inp.causal), inp.scale, inp.dropout_p, inp.softcap)
        outputs = ops.fwd(*args)
        ops._setup_context(ctx, args, outputs)
        return outputs[0]

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv, dbias, *_ = ops._backward(ctx, dout, None, None)
        return dq, dk, dv, dbias, None, None, None
