"""The registered ops (namespace `flash`), their fakes and autograd, and the public function.

Three layers, as in FlashAttention's interface file:

1. `flash::fwd` / `flash::bwd`: torch.library custom ops with fake (meta) implementations beside
   them, so torch.compile and dynamic shapes trace through without running a kernel. They are
   defined in Python so they exist without any CUDA build; the impl dispatches to a kernel
   backend at run time (flash_inductor.dispatch).
2. Autograd registered on `flash::fwd` (backward calls `flash::bwd`), unpacking by name.
3. `attention(...)`, the documented entry point, validating its input once.

`flash::fwd` returns (out, lse, rng): lse serves the backward (and ring attention); rng is the
Philox seed the dropout used, so the backward regenerates the same mask instead of storing it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import dispatch, kernels_in_graph
from .inputs import AttentionInputs, accumulation_dtype, empty_in_layout, in_layout, validate




def _draw_seed(device: torch.device) -> Tensor:
    """A fresh Philox seed from the default generator, so torch.manual_seed governs dropout."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device="cpu").to(device)


@torch.library.custom_op("flash::fwd", mutates_args=())
def fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    seed: Optional[Tensor],
    causal: int,
    scale: float,
    dropout_p: float,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    return _fwd_body(q, k, v, bias, seed, causal, scale, dropout_p, softcap)


def _fwd_body(q, k, v, bias, seed, causal: int, scale: float, dropout_p: float, softcap: float = 0.0):
    """`flash::fwd`'s implementation; `attention_with_lse` calls it directly (with
    `_EagerAttention` for autograd) where nothing could tell the difference (`_unobserved`)."""
    inp = AttentionInputs.from_op(q, k, v, bias, causal, scale, dropout_p, softcap)
    if dropout_p > 0.0:
        rng = seed.to(device=q.device, dtype=torch.int64).clone() if seed is not None else _draw_seed(q.device)
    else:
        rng = torch.empty(0, dtype=torch.int64, device=q.device)
    out, lse = dispatch.select(inp).forward(inp, rng if dropout_p > 0.0 else None)
    # The fakes promise out in q's layout (inputs.empty_in_layout) and a contiguous lse; a
    # kernel may hand back another layout.
    return in_layout(out, q), lse.contiguous(), rng


@fwd.register_fake
def _fwd_fake(q, k, v, bias, seed, causal, scale, dropout_p, softcap=0.0):
    b, hq, nq, _ = q.shape
    out = empty_in_layout(q, (b, hq, nq, v.shape[3]))
    lse = q.new_empty((b, hq, nq), dtype=accumulation_dtype(q.dtype))
    rng = q.new_empty((2,) if dropout_p > 0.0 else (0,), dtype=torch.int64)
    return out, lse, rng


@torch.library.custom_op("flash::bwd", mutates_args=())
def bwd(
    dout: Tensor,
    dlse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    rng: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: int,
    scale: float,
    dropout_p: float,
    bias_requires_grad: bool,
    softcap: float = 0.0,
    fwd_kernel: str = "",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients; dbias is an empty tensor unless bias_requires_grad (ops cannot return None).

    Dispatch selects from the same inputs as the forward did, and `fwd_kernel` is the kernel the
    forward was forced to ("" when it chose by itself), so the backward runs the kernel whose
    dropout mask it must regenerate even where the setting is not visible (the autograd
    engine's thread does not see a thread-local `flash_inductor.config.kernel`).
    """
    inp = AttentionInputs.from_op(q, k, v, bias, causal, scale, dropout_p, softcap)
    dq, dk, dv, dbias = dispatch.select(inp, kernel=fwd_kernel or None).backward(
        inp, rng if dropout_p > 0.0 else None, out, lse, dout, dlse, bias_requires_grad
    )
    if dbias is None:
        dbias = q.new_empty(0)
    return in_layout(dq, q), in_layout(dk, k), in_layout(dv, v), dbias.contiguous()


@bwd.register_fake
def _bwd_fake(dout, dlse, q, k, v, bias, rng, out, lse, causal, scale, dropout_p, bias_requires_grad, softcap=0.0,
              fwd_kernel=""):
    dbias = bias.new_empty(bias.shape) if bias_requires_grad else q.new_empty(0)
    return empty_in_layout(q), empty_in_layout(k), empty_in_layout(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, _seed, causal, scale, dropout_p, softcap = inputs
    out, lse, rng = output
    ctx.save_for_backward(q, k, v, bias, out, lse, rng)
    # An unused lse (every model; only ring attention differentiates it) then reaches the
    # backward as None, not as a zeros tensor that costs a fill kernel per layer and a read.
    ctx.set_materialize_grads(False)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.softcap = causal, scale, dropout_p, softcap
    ctx.kernel = dispatch.forced_kernel() or ""  # the backward must run the forward's kernel


def _backward(ctx, dout, dlse, _drng):
    q, k, v, bias, out, lse, rng = ctx.saved_tensors
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    bias_requires_grad = bias is not None and ctx.needs_input_grad[3] and bias.dtype != torch.bool
    dq, dk, dv, dbias = bwd(
        dout, dlse, q, k, v, bias, rng, out, lse,
        ctx.causal, ctx.scale, ctx.dropout_p, bias_requires_grad, ctx.softcap, *((ctx.kernel,) if ctx.kernel else ()),
    )
    return dq, dk, dv, (dbias if bias_requires_grad else None), None, None, None, None, None


fwd.register_autograd(_backward, setup_context=_setup_context)

# Under torch.compile on CUDA, both ops decompose into their Triton kernels (kernels_in_graph).
kernels_in_graph.register(fwd, bwd)


def _unobserved(*tensors) -> bool:
    """Whether running the op's body (and its registered autograd) directly is indistinguishable
    from calling `flash::fwd`: plain tensors, outside torch.compile and torch.func transforms,
    with no dispatch or function mode active and the profiler off. torch.library's Python layers
    then cost a call about 23 µs without autograd and 65 µs with it, for nothing (the CPU machine:
    `attention()` under no_grad 53 → 34 µs; on inputs that require grad 101 → 47 µs)."""
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():
        return False
    if torch._C._is_torch_function_mode_enabled() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) in (Tensor, torch.nn.Parameter) for t in tensors)


class _EagerAttention(torch.autograd.Function):
    """`flash::fwd` with the autograd registered on it (`_setup_context`, `_backward`), for eager
    calls nothing else observes. The backward still calls `flash::bwd`, so a double backward fails
    as it does through the op."""

    @staticmethod
    def forward(ctx, q, k, v, bias, causal, scale, dropout_p, softcap):
        inputs = (q, k, v, bias, None, causal, scale, dropout_p, softcap)
        out, lse, rng = _fwd_body(*inputs)
        _setup_context(ctx, inputs, (out, lse, rng))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return (*_backward(ctx, dout, dlse, None)[:4], None, None, None, None)


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor] = None,
    *,
    causal: bool | str = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """`attention`, also returning lse [B, Hq, Nq] (float32; -inf on fully masked rows).

    lse is differentiable: its gradient is folded into the backward, which is what merging
    partial results (ring / context-parallel attention) needs.
    """
    if isinstance(q, Tensor) and q.is_nested:
        raise ValueError("attention_with_lse does not take nested tensors (lse of a nested batch is not "
                         "nested); use attention, or attention_varlen on the packed values")
    inp = validate(q, k, v, bias, causal=causal, scale=scale, dropout_p=dropout_p, softcap=softcap)
    extra = (inp.softcap,) if inp.softcap else ()
    if _unobserved(q, k, v, bias):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
            return _EagerAttention.apply(q, k, v, bias, int(inp.causal), inp.scale, inp.dropout_p, inp.softcap)
        return _fwd_body(q, k, v, bias, None, int(inp.causal), inp.scale, inp.dropout_p, inp.softcap)[:2]
    out, lse, _ = fwd(q, k, v, bias, None, int(inp.causal), inp.scale, inp.dropout_p, *extra)
    return out, lse


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor] = None,
    *,
    causal: bool | str = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    softcap: Optional[float] = None,
) -> Tensor:
    """softmax(q·kᵀ·scale + bias [+ causal mask]) [dropout] · v, fused, in O(N) memory.

    Args:
        q: [B, Hq, Nq, D] float16, bfloat16, float32 or float64.
        k, v: [B, Hkv, Nk, D] and [B, Hkv, Nk, Dv]; Hq must be a multiple of Hkv (GQA/MQA:
            query head h reads KV head h // (Hq // Hkv); K/V are never repeated).
        bias: None; a float tensor added to the scaled scores; or a bool keep-mask (True =
            attend). Any shape that broadcasts to [B, Hq, Nq, Nk]: size-1 dims are read with
            stride 0, never expanded. A float bias that requires grad gets its gradient,
            summed over its broadcast dims.
        causal: False; True or 'top_left' (query i sees keys j <= i, SDPA's is_causal); or
            'bottom_right' (queries are the last Nq of the Nk positions: j <= i + Nk - Nq).
            Fully masked blocks are skipped, not computed.
        scale: multiplies q·kᵀ; default 1/sqrt(D).
        dropout_p: dropout on the probabilities (Philox in-kernel, regenerated in backward).
        softcap: None, or c > 0 for logit soft-capping: the scaled scores become
            c·tanh(s / c) before the bias and masks are applied (Gemma 2).

    Returns:
        out [B, Hq, Nq, Dv] in q's dtype. A row whose keys are all masked (keep-mask, causal
        or -inf bias) returns zeros, as SDPA's boolean masks and FlexAttention do.

    Head dims up to 256; D must match between q and k. Errors name the argument and limit.

    q, k, v may also be jagged nested tensors [B, H, j, D] (SDPA's convention): each sequence
    attends only to its own keys, no padding is computed, and the result is nested
    (flash_inductor.varlen; `attention_varlen` takes packed tensors and offsets directly).
    """
    if isinstance(q, Tensor) and q.is_nested:
        from .varlen import attention_nested

        return attention_nested(q, k, v, bias, causal=causal, scale=scale, dropout_p=dropout_p, softcap=softcap)
    return attention_with_lse(q, k, v, bias, causal=causal, scale=scale, dropout_p=dropout_p, softcap=softcap)[0]
