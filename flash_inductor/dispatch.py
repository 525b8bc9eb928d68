"""Kernel dispatch: the first backend that accepts the input runs it.

Order: CUTLASS's Hopper forward (when built for this GPU), Triton, the CUTLASS sm_80 kernels (after
Triton: measured slower on an H100, not yet measured on an A100), PyTorch's fused CPU kernel
(aten_cpu), the PyTorch reference. The environment variable
FLASH_INDUCTOR_KERNEL=cutlass|triton|cutlass_sm80|aten_cpu|reference,
or `flash_inductor.config.kernel`,
forces one backend; a forced backend that refuses the input raises its reasons instead of
falling back, so a benchmark never measures a different kernel than it names.
"""

from __future__ import annotations

import os
import threading

import torch

from .backends.aten_cpu import AtenCpuBackend
from .backends.base import KernelBackend
from .backends.cutlass import CutlassBackend
from .backends.cutlass_sm80 import CutlassSm80Backend
from .backends.reference import ReferenceBackend
from .backends.triton import TritonBackend
from .inputs import AttentionInputs

ENV_VAR = "FLASH_INDUCTOR_KERNEL"


class _Config(threading.local):
    """Settings read on every dispatch. `kernel=None` means: choose automatically."""

    def __init__(self):
        self.kernel: str | None = None
        # Under torch.compile, let Inductor launch the Triton kernels from its generated code
        # instead of calling the op (flash_inductor.kernels_in_graph says when and why).
        self.kernels_in_graph: bool = True


config = _Config()

BACKENDS: tuple[KernelBackend, ...] = (CutlassBackend(), TritonBackend(), CutlassSm80Backend(), AtenCpuBackend(),
                                       ReferenceBackend())
BY_NAME = {b.NAME: b for b in BACKENDS}
KNOWN_NAMES = ("cutlass", "triton", "cutlass_sm80", "aten_cpu", "reference")


class NoKernelError(RuntimeError):
    """No backend accepts the input; the message lists every backend's reasons."""


def forced_kernel() -> str | None:
    name = config.kernel or os.environ.get(ENV_VAR) or None
    if name is None:
        return None
    name = name.strip().lower()
    if name not in KNOWN_NAMES:
        raise ValueError(
            f"{ENV_VAR}={name!r} is not a kernel (accepted: {', '.join(KNOWN_NAMES)})"
        )
    return name


def reasons_by_backend(inp: AttentionInputs, varlen: bool = False) -> dict[str, list[str]]:
    """Every backend's refusal reasons for this input (empty list = accepts)."""
    out = {}
    for b in BACKENDS:
        out[b.NAME] = b.not_supported_reasons(inp, varlen)
    return out


def _format(reasons: dict[str, list[str]]) -> str:
    lines = []
    for name, rs in reasons.items():
        lines.append(f"  {name}: " + ("accepts" if not rs else "; ".join(rs)))
    return "\n".join(lines)


# The automatic choice per input signature. Computing every backend's reasons took about a third
# of an eager call's host time (70 µs a call on the CPU machine; 130-300 µs on the GPU hosts, where
# the kernel at N=2048 takes 62), and a model calls the op with the same few signatures.
_CHOICES: dict[tuple, KernelBackend] = {}
_CHOICES_MAX = 1024


def _signature(inp: AttentionInputs, varlen: bool) -> tuple | None:
    """Everything a backend's reasons read (the declared table, the CUTLASS limits on sizes,
    strides and pointer alignment, the environment), or None where it cannot be read without
    side effects: fake or symbolic tensors under tracing, which are never cached."""
    ts = (inp.q, inp.k, inp.v) if inp.bias is None else (inp.q, inp.k, inp.v, inp.bias)
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in ts):
        return None
    facts = tuple((t.device, t.dtype, tuple(t.shape), t.stride(), t.data_ptr() % 16) for t in ts)
    grad = inp.bias is not None and inp.bias.requires_grad
    return (varlen, inp.causal, inp.scale, inp.dropout_p, inp.softcap, grad, os.environ.get("TRITON_INTERPRET"),
            torch.are_deterministic_algorithms_enabled(), facts)


def clear_choices() -> None:
    """Forget the cached choices; for whoever changes what a backend declares at run time."""
    _CHOICES.clear()


def select(inp: AttentionInputs, varlen: bool = False, kernel: str | None = None) -> KernelBackend:
    """`varlen`: `inp` describes a packed variable-length batch (flash_inductor/varlen.py).
    `kernel`: the kernel the forward was forced to, which its backward must run (the forward's
    dropout mask is its kernel's own); None reads the setting now."""
    forced = kernel or forced_kernel()
    if forced is not None:
        backend = BY_NAME.get(forced)
        reasons = backend.not_supported_reasons(inp, varlen)
        if reasons:
            raise NoKernelError(
                f"{ENV_VAR}={forced} was forced but that kernel refuses this input: "
                + "; ".join(reasons)
                + ". Unset the setting to let dispatch fall back."
            )
        return backend
    key = _signature(inp, varlen)
    chosen = _CHOICES.get(key) if key is not None else None
    if chosen is not None:
        return chosen
    for b in BACKENDS:
        if not b.not_supported_reasons(inp, varlen):
            if key is not None:
                if len(_CHOICES) >= _CHOICES_MAX:
                    _CHOICES.clear()
                _CHOICES[key] = b
            return b
    raise NoKernelError("no attention kernel accepts this input:\n" + _format(reasons_by_backend(inp, varlen)))


def backward_note(inp: AttentionInputs, chosen: str) -> str:
    """For the rewrite's report: which kernels run the backward of `chosen`'s forward when they
    are not its own, and why ("" when they are). Builds nothing."""
    backend = next((b for b in BACKENDS if b.NAME == chosen), None)
    reasons = getattr(backend, "backward_reasons", None)
    if reasons is None:
        return ""
    why = reasons(inp, check_library=False)
    return f"backward by {backend.BACKWARD_KERNEL} ({'; '.join(why)})" if why else ""


def explain_choice(inp: AttentionInputs) -> tuple[str, str]:
    """(the kernel that runs, why each kernel ahead of it in the order refused)."""
    reasons = reasons_by_backend(inp)
    try:
        chosen = select(inp).NAME
    except (NoKernelError, ValueError) as e:
        return "none", str(e)
    ahead = []
    for name, rs in reasons.items():
        if name == chosen:
            break
        ahead.append(f"{name}: {'; '.join(rs)}")
    return chosen, " | ".join(ahead)
