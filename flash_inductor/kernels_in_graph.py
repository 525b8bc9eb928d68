"""Under torch.compile, `flash::fwd` / `flash::bwd` become calls of the Triton kernels themselves.

Why: Inductor calls an opaque custom op through the Python dispatcher, our launch glue and
Triton's autotuner and launcher: about 145 µs of host time per call on an H100 host, more
than the whole kernel at BERT-size shapes (44 µs), so a compiled model was host-bound on
attention. Decomposed into `torch.library.wrap_triton` calls while AOTAutograd traces the
graph, the kernels become user-defined Triton kernels in Inductor's output code: their
configs are tuned once at compile time, they are launched by Inductor's generated launcher,
and CUDA graphs (mode="reduce-overhead") can capture them.

This is what `torch.library.triton_op` does for its ops, with one difference that is the
reason this module exists: triton_op always decomposes, and ours must not everywhere. The
rule below decomposes only when all of these hold, and otherwise leaves the op opaque, to
dispatch at run time exactly as in eager:

- every tensor argument is on CUDA (the CPU reference stays one call, not an unrolled graph);
- dispatch picks the Triton backend for this input (a forced or refusing backend is honoured),
  or, for the backward, a backend whose backward is Triton's (CUTLASS today: its forward stays
  one opaque op, its backward is Triton's kernels in the graph);
- sizes and strides are static: the kernels specialise and autotune per shape, and Inductor
  would have to guard on every one of them anyway (`dynamic=True` keeps the opaque op);
- the setting is on: `flash_inductor.config.kernels_in_graph` (default True) or the
  environment variable FLASH_INDUCTOR_KERNELS_IN_GRAPH=0 to switch it off;
- not under torch.export, which keeps custom ops whole (as it does for triton_op).
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

from . import dispatch, kernel_analysis_cache
from .inputs import AttentionInputs

log = logging.getLogger("flash_inductor")

ENV_VAR = "FLASH_INDUCTOR_KERNELS_IN_GRAPH"


def enabled() -> bool:
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    return dispatch.config.kernels_in_graph


def _is_static(t: torch.Tensor) -> bool:
    return not any(
        isinstance(x, torch.SymInt) for x in (*t.shape, *t.stride(), t.storage_offset())
    )


def _triton_decision(inp: AttentionInputs, tensors, phase: str = "fwd", kernel: str | None = None) -> str | None:
    """None if the op may decompose into the Triton kernels; else why not (for the log).

    `phase="bwd"` asks about the backward, which a backend may hand to another kernel
    (`KernelBackend.backward_kernel`: a CUTLASS forward may be followed by the Triton backward, and
    that backward then runs in the graph like any other)."""
    if not enabled():
        return "switched off"
    if any(t.device.type != "cuda" for t in tensors):
        return "not on CUDA"
    if not all(_is_static(t) for t in tensors):
        return "symbolic shapes"
    try:
        backend = dispatch.select(inp, kernel=kernel)
    except Exception as e:  # the opaque op will raise the same error at run time
        return f"dispatch refused: {e}"
    chosen = backend.backward_kernel(inp) if phase == "bwd" else backend.NAME
    if chosen != "triton":
        return f"dispatch picks {chosen}"
    return None


def _export_in_progress() -> bool:
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


def _graph_seed(device) -> torch.Tensor:
    """A dropout seed drawn in the graph, on the device, so Inductor generates it from its own
    seeded RNG (no host round trip inside a captured graph: every replay draws anew); two 31-bit
    words key Philox."""
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=device)


def _fwd_in_graph(q, k, v, bias, seed, causal, scale, dropout_p, softcap=0.0):
    from torch.library import wrap_triton

    from .kernels import triton_attention

    inp = AttentionInputs.from_op(q, k, v, bias, causal, scale, dropout_p, softcap)
    if dropout_p > 0.0:
        rng = seed.to(device=q.device, dtype=torch.int64).clone() if seed is not None else _graph_seed(q.device)
    else:
        rng = torch.empty(0, dtype=torch.int64, device=q.device)
    out, lse = triton_attention.forward(inp, rng if dropout_p > 0.0 else None, launch=wrap_triton)
    return out, lse, rng


def _bwd_in_graph(
    dout, dlse, q, k, v, bias, rng, out, lse, causal, scale, dropout_p, bias_requires_grad, softcap=0.0, fwd_kernel=""
):
    from torch.library import wrap_triton

    from .kernels import triton_attention

    inp = AttentionInputs.from_op(q, k, v, bias, causal, scale, dropout_p, softcap)
    dq, dk, dv, dbias = triton_attention.backward(
        inp, rng if dropout_p > 0.0 else None, out, lse, dout, dlse, bias_requires_grad,
        launch=wrap_triton,
    )
    if dbias is None:
        dbias = q.new_empty(0)
    return dq, dk, dv, dbias


# One memo per trace (keyed by its FunctionalTensorMode, dropped with it): the mask tiles' maps
# that the trace's calls share (mask_tiles.shared_in_trace).
_trace_memos: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rule(op_name, in_graph, inputs_of, phase):
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    known = (torch.Tensor, FakeTensor, FunctionalTensor)

    def rule(mode, func, types, args, kwargs):
        if any(not issubclass(t, known) for t in types):
            return NotImplemented  # a tensor subclass: let it handle the op first
        if kwargs or _export_in_progress():
            return mode.__torch_dispatch__(func, types, args, kwargs or {})
        inp, tensors, kernel = inputs_of(*args)
        why_not = _triton_decision(inp, tensors, phase, kernel)
        if why_not is not None:
            log.debug("%s stays one opaque op in the graph: %s", op_name, why_not)
            if phase == "fwd" and inp.dropout_p > 0.0 and args[4] is None and inp.device.type == "cuda":
                # The graph draws the opaque forward's seed, as it does the in-graph one's
                # (_fwd_in_graph): the op's own draw is a host-side copy at run time, which a
                # CUDA graph would replay as one fixed seed, the same mask at every step.
                with mode:
                    seed = _graph_seed(args[0].device)
                args = (*args[:4], seed, *args[5:])
            return mode.__torch_dispatch__(func, types, args, {})
        kernel_analysis_cache.install()  # torch analyses every launch of ours at every stage
        from torch._inductor import config as inductor_config

        from .kernels import triton_attention

        from .kernels import mask_tiles

        with (triton_attention.tuning_in_graph(bool(inductor_config.max_autotune)),
              mask_tiles.shared_in_trace(_trace_memos.setdefault(mode, {})), mode):
            return in_graph(*args)

    return rule


def _fwd_inputs(q, k, v, bias, seed, causal, scale, dropout_p, softcap=0.0):
    inp = AttentionInputs.from_op(q, k, v, bias, causal, scale, dropout_p, softcap)
    return inp, [t for t in (q, k, v, bias, seed) if t is not None], None


def _bwd_inputs(dout, dlse, q, k, v, bias, rng, out, lse, causal, scale, dropout_p, _brg, softcap=0.0, fwd_kernel=""):
    inp = AttentionInputs.from_op(q, k, v, bias, causal, scale, dropout_p, softcap)
    return inp, [t for t in (dout, dlse, q, k, v, bias, rng, out, lse) if t is not None], fwd_kernel or None


def register(fwd_op, bwd_op) -> bool:
    """Install the decomposition rules on the two custom ops; False if this torch lacks them."""
    try:
        from torch._subclasses.functional_tensor import FunctionalTensorMode
        from torch.library import wrap_triton  # noqa: F401  (torch >= 2.6)
    except ImportError as e:
        log.info("kernels stay opaque under torch.compile: %s", e)
        return False
    fwd_op.register_torch_dispatch(FunctionalTensorMode, _rule("flash::fwd", _fwd_in_graph, _fwd_inputs, "fwd"))
    bwd_op.register_torch_dispatch(FunctionalTensorMode, _rule("flash::bwd", _bwd_in_graph, _bwd_inputs, "bwd"))
    return True
