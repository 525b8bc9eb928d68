"""Memoise torch's analysis of which arguments our Triton kernels read and write.

Why: a user-defined Triton kernel in a compiled graph is analysed by compiling it to TTIR and
walking the result (`torch._higher_order_ops.triton_kernel_wrap.identify_accessed_tensors`,
`identify_mutated_tensors` in older torch), and torch asks again for every launch at every stage
that needs the answer: functionalization, Inductor's lowering, its IR node. Nothing is shared
between the asks (pytorch/pytorch#193227, open, moves the question to trace time). Our kernels
are large (TTIR of the forward with every feature inlined: ~0.1 s on this project's CI machine)
and a model launches them once a layer in the forward and three times in the backward, so a
cold compile of GPT-2 medium with backend="flash" took 88 s for the forward alone on an H100
host where backend="inductor" took 42 s (benchmarks/compile_time.py, session 11).

The answer is a function of the kernel, its constexprs and scalar arguments, and the dtypes of
its tensor arguments: TTIR generation itself replaces every tensor with a two-element tensor of
its dtype and every symbolic size with 2 before compiling. Those are the key. It is kept only
for kernels defined in this package, whose launches we write; any other kernel in the graph is
analysed by torch exactly as before. Each caller gets its own copy of the answer.

Remove when the torch versions we support all carry the trace-time analysis.
"""

from __future__ import annotations

import copy
import functools
import logging
import os

import torch

log = logging.getLogger("flash_inductor")

# torch >= 2.12 names it identify_accessed_tensors; 2.11 and older identify_mutated_tensors.
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")
_installed: bool | None = None  # install()'s answer, once asked
# FLASH_INDUCTOR_KERNEL_ANALYSIS_CACHE=0 leaves torch's analysis as it is (to time the difference).
ENV_VAR = "FLASH_INDUCTOR_KERNEL_ANALYSIS_CACHE"


def _jit_function(kernel):
    """The JITFunction itself, or the one an Autotuner / Heuristics wraps; None if neither."""
    from triton.runtime.jit import JITFunction

    for _ in range(4):
        if isinstance(kernel, JITFunction):
            return kernel
        kernel = getattr(kernel, "fn", None)
    return None


def is_ours(kernel) -> bool:
    """Whether the kernel is defined in this package."""
    jit = _jit_function(kernel)
    return jit is not None and getattr(jit.fn, "__module__", "").startswith("flash_inductor.")


def _arg_key(value):
    """What of one argument the TTIR can depend on, or raise TypeError when it cannot be keyed."""
    import sympy

    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("sym",)
    if isinstance(value, (torch.Tensor, FakeTensor)):
        return ("tensor", value.dtype)
    get_dtype = getattr(value, "get_dtype", None)  # Inductor's TensorBox and other IR nodes
    if callable(get_dtype) and type(value).__module__.startswith("torch._inductor"):
        return ("tensor", get_dtype())
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    raise TypeError(f"unkeyed argument {type(value).__name__}")


def _key(kernel, kwargs, tma_descriptor_metadata):
    """Keyed by the JITFunction, not the kernel object: tracing registers a fresh Autotuner, with
    the configs pruned for that launch, at every launch. TTIR generation takes an Autotuner's
    first config's constexprs (BLOCK_M, ...), so those join the key."""
    if tma_descriptor_metadata:
        return None
    configs = getattr(kernel, "configs", None) or []
    first = tuple(sorted(configs[0].kwargs.items())) if configs else ()
    try:
        args = tuple(sorted((name, _arg_key(v)) for name, v in kwargs.items()))
        hash(first)
    except TypeError:
        return None
    return (id(_jit_function(kernel)), first, args)


def memoised(analysis):
    cache: dict = {}

    @functools.wraps(analysis)
    def wrapper(kernel, kwargs, *args, **kw):
        tma = args[0] if args else kw.get("tma_descriptor_metadata")
        key = _key(kernel, kwargs, tma) if is_ours(kernel) else None
        if key is None:
            return analysis(kernel, kwargs, *args, **kw)
        from torch._dynamo.utils import counters

        if key not in cache:
            counters["flash_inductor"]["kernel_analysis_misses"] += 1
            # Keep the kernel alive with its answer: the key holds its JITFunction's id.
            cache[key] = (kernel, analysis(kernel, kwargs, *args, **kw))
        else:
            counters["flash_inductor"]["kernel_analysis_hits"] += 1
        return copy.deepcopy(cache[key][1])

    wrapper.flash_inductor_cache = cache
    return wrapper


def install() -> bool:
    """Wrap torch's analysis once per process; False where this torch has none we know."""
    global _installed
    if _installed is None:
        _installed = _install()
    return _installed


def _install() -> bool:
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    try:
        from torch._higher_order_ops import triton_kernel_wrap as twk
    except ImportError:
        return False
    import importlib

    found = False
    for name in _ANALYSES:
        original = getattr(twk, name, None)
        if original is None or hasattr(original, "flash_inductor_cache"):
            continue
        wrapped = memoised(original)
        # Callers that imported the function by name at module level hold their own binding.
        for module_name in (twk.__name__, "torch._inductor.ir", "torch._inductor.lowering"):
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            if getattr(module, name, None) is original:
                setattr(module, name, wrapped)
        found = True
    if not found:
        log.info("torch has no Triton kernel analysis this module knows (%s); nothing memoised", ", ".join(_ANALYSES))
    return found
