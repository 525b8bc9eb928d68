"""Build the CUTLASS kernels in csrc/ into shared libraries, with ninja, on first use; cached.

Four kinds of library, each built only on a GPU that runs it:

* HOPPER (`libflash_cutlass.so`, sm_90a): the TMA + warp-specialised forward of example 88, one
  translation unit per instance (dtype × head dim × mask × how the bias is read, `INSTANCES`)
  instantiating `flash_cutlass::run_fwd` from csrc/fwd_kernel.cuh.
* HOPPER_DROPOUT (`libflash_cutlass_dropout.so`, sm_90a): the same forward with dropout
  (csrc/fwd_dropout.cuh), the same instances with dropout compiled in (`DROPOUT_INSTANCES`). A
  library of its own, built on the first forward with dropout: only training with dropout needs
  it, and the forward library's build stays within its few minutes.
* HOPPER_BWD (`libflash_cutlass_bwd.so`, sm_90a): the backward, example 88's warp-specialised
  backward collective with our consumer (csrc/bwd_kernel.cuh), one unit per dtype × head dim ×
  mask × bias (`BWD_INSTANCES`). A library of its own, built on the first backward, so inference never
  waits for it and each library's build stays within its own few minutes.
  Head dims 64 and 256 have libraries of their own (`bwd_family`); head dim 256's runs its own
  kernel (csrc/bwd_d256.cuh: 64 x 64 tiles that fit its shared memory).
* AMPERE (`libflash_cutlass_sm80.so`, sm_80 code, SASS for sm_80 and sm_90 plus compute_80 PTX):
  example 41's memory-efficient forward and backward with bias, bias gradient, causal masks,
  dropout and packed variable-length batches, one unit per (pass, dtype, head-dim bucket,
  dropout) (`AMPERE_INSTANCES`) from csrc/sm80_fwd.cuh and csrc/sm80_bwd.cuh.

Each library also gets an `api.cu`, the C entry point that switches on the instance. Ninja
compiles the units in parallel.

Why a plain shared library loaded with ctypes, not a torch C++ extension: the kernels need
nothing from torch (pointers, strides, a stream), so the library is independent of torch's C++
ABI: one build serves torch 2.11 and 2.13, builds without torch's headers, and a torch upgrade
never forces a rebuild. (docs/design.md, "CUTLASS".)

Where from: the CUTLASS and CuTe headers, and example 88's Hopper FMHA collectives, come from
the `nvidia-cutlass` wheel (`cutlass_library/source`), or from a CUTLASS checkout named by
FLASH_INDUCTOR_CUTLASS_DIR. nvcc is found through CUDA_HOME or PATH.

Cache: ~/.cache/flash_inductor/cutlass/<key>/ (FLASH_INDUCTOR_CACHE_DIR overrides the root). The
key hashes the sources, the generated units, the flags, the nvcc version and the CUTLASS headers'
version, so a change to any of them builds anew and an unchanged tree reuses the library. A file
lock makes concurrent first uses (several ranks, several workers) build once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import os
import pathlib
import shutil
import subprocess
import sys
import threading

def _csrc_dir() -> pathlib.Path:
    """csrc/ of a source checkout (editable install), or the copy a wheel carries in the package."""
    here = pathlib.Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "fwd_kernel.cuh").is_file():
            return candidate
    return here.parent / "csrc"


CSRC = _csrc_dir()
SOURCES = ("flash_cutlass.h", "launch.cuh", "element_bits.cuh", "fwd_kernel.cuh", "fwd_bias_tma.cuh",
           "fwd_dropout.cuh", "dropout_philox.h")
AMPERE_SOURCES = ("flash_cutlass.h", "flash_cutlass_sm80.h", "sm80_common.cuh", "sm80_fwd.cuh", "sm80_bwd.cuh",
                  "aten_shim/flash_cutlass_check.h", "aten_shim/ATen/cuda/CUDAGeneratorImpl.h",
                  "aten_shim/ATen/cuda/CUDAGraphsUtils.cuh", "aten_shim/ATen/cuda/CUDAContext.h",
                  "aten_shim/c10/cuda/CUDAGuard.h")
BWD_SOURCES = ("flash_cutlass.h", "flash_cutlass_bwd.h", "launch.cuh", "element_bits.cuh", "bwd_kernel.cuh")
BWD_DROPOUT_SOURCES = BWD_SOURCES + ("bwd_dropout.cuh", "dropout_philox.h")
BWD_D256_SOURCES = ("flash_cutlass.h", "flash_cutlass_bwd.h", "launch.cuh", "element_bits.cuh", "bwd_d256.cuh",
                    "dropout_philox.h")
LIB_NAME = "libflash_cutlass.so"
DROPOUT_LIB_NAME = "libflash_cutlass_dropout.so"
BWD_LIB_NAME = "libflash_cutlass_bwd.so"
BWD_DROPOUT_LIB_NAME = "libflash_cutlass_bwd_dropout.so"
AMPERE_LIB_NAME = "libflash_cutlass_sm80.so"
# No -lcuda: CUTLASS reaches the driver (TMA descriptors) through cudaGetDriverEntryPoint, so the
# library links only the CUDA runtime (statically, nvcc's default) and loads without a driver stub.
LINK_FLAGS = ("-shared",)

DTYPES = {"fp16": "FLASH_CUTLASS_FP16", "bf16": "FLASH_CUTLASS_BF16"}
MASKS = {"none": "FLASH_CUTLASS_NO_MASK", "causal": "FLASH_CUTLASS_CAUSAL_TOP_LEFT",
         "causal_br": "FLASH_CUTLASS_CAUSAL_BOTTOM_RIGHT", "causal_folded": "FLASH_CUTLASS_CAUSAL_FOLDED"}
# The forward library's head dims; head dim 64 is a library of its own (D64_INSTANCES below).
HEAD_DIMS = (128, 256)


# How a bias instance reads its bias (csrc/fwd_kernel.cuh's BiasRead): none, from global memory
# in the softmax, or a tile per key block loaded by TMA into the K/V ring (csrc/fwd_bias_tma.cuh).
BIAS_READS = {"none": 0, "softmax": 1, "tma": 2}
# The TMA bias needs a bias tile the size of a K/V stage: head dim 128 (128 x 128 keys).
TMA_BIAS_HEAD_DIMS = (128,)


@dataclasses.dataclass(frozen=True)
class Instance:
    dtype: str  # a key of DTYPES
    head_dim: int
    mask: str  # a key of MASKS
    bias: bool = False  # an additive bias in q's dtype
    tma_bias: bool = False  # the bias loaded by TMA (else read in the softmax); only with bias
    dropout: bool = False  # dropout on the probabilities (the HOPPER_DROPOUT family)

    def __post_init__(self):
        if self.tma_bias and not self.bias:
            raise ValueError("tma_bias needs bias=True")

    @property
    def bias_read(self) -> int:
        return BIAS_READS["tma" if self.tma_bias else "softmax" if self.bias else "none"]

    @property
    def _suffix(self) -> str:
        return f"{'_bias' if self.bias else ''}{'_tma' if self.tma_bias else ''}{'_dropout' if self.dropout else ''}"

    @property
    def stem(self) -> str:
        return f"fwd_{self.dtype}_d{self.head_dim}_{self.mask}{self._suffix}"

    @property
    def label(self) -> str:
        """How flash_cutlass_instances() lists it."""
        return f"{self.dtype}/{self.head_dim}/{self.mask}{self._suffix.replace('_bias', '/bias').replace('_dropout', '/dropout')}"

    @property
    def template_args(self) -> str:
        return (f"{DTYPES[self.dtype]}, {self.head_dim}, {MASKS[self.mask]}, {self.bias_read}, "
                f"{'true' if self.dropout else 'false'}")

    def source(self) -> str:
        return f'#include "fwd_kernel.cuh"\nFLASH_CUTLASS_INSTANCE({self.template_args})\n'


# Per head dim one bias read: by TMA where it fits (head dim 128), else in the softmax. Head dim
# 128's softmax-read instances are not built (benchmarks/cutlass_variants.py builds them): the
# Triton kernel is as fast there (H200: 344 vs 339 TFLOP/s, bias forward at N=8192), and the 8
# units would put the default build past 3 minutes on 16 cores (202 s measured with them).
INSTANCES = tuple(
    Instance(d, h, m, b, b and h in TMA_BIAS_HEAD_DIMS)
    for d, h, m, b in itertools.product(DTYPES, HEAD_DIMS, MASKS, (False, True)))
# The same set with dropout, for its own library (32 units: as long a build as the forward's).
DROPOUT_INSTANCES = tuple(dataclasses.replace(i, dropout=True) for i in INSTANCES)
# Head dim 64 (its bias read in the softmax), a library of its own, built on the first forward at
# head dim 64 that dispatch sends to CUTLASS: a model has one or two head dims, and the 16 units
# kept out of the forward library keep its build under 3 minutes on 16 cores.
D64_INSTANCES = tuple(Instance(d, 64, m, b) for d, m, b in itertools.product(DTYPES, MASKS, (False, True)))
D64_DROPOUT_INSTANCES = tuple(dataclasses.replace(i, dropout=True) for i in D64_INSTANCES)

# The backward's head dims. 64 and 128: example 88's backward collective with our consumer
# (csrc/bwd_kernel.cuh), whose tiles (64 queries x 128 keys) do not fit head dim 256 in shared
# memory; 256: a kernel of its own (csrc/bwd_d256.cuh, 64 x 64 tiles). Each takes the bias, its
# gradient and dropout. Each head dim is a library of its own (and another with dropout), built on
# the first backward of that head dim: a model has one or two head dims, and no build passes 3
# minutes on 16 cores.
BWD_HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class BwdInstance:
    dtype: str  # a key of DTYPES
    head_dim: int
    mask: str  # a key of MASKS
    bias: bool = False  # the forward's additive bias, read per score
    bias_grad: bool = False  # and its gradient (dS) written per score
    dropout: bool = False  # the forward's keep bits redrawn (the HOPPER_BWD_DROPOUT family)

    def __post_init__(self):
        if self.bias_grad and not self.bias:
            raise ValueError("bias_grad needs bias=True")
        if self.head_dim not in BWD_HEAD_DIMS:
            raise ValueError(f"no backward at head dim {self.head_dim} (head dims {BWD_HEAD_DIMS})")

    @property
    def own_kernel(self) -> bool:
        """Head dim 256: csrc/bwd_d256.cuh's kernel (run_bwd_d256), not example 88's collective."""
        return self.head_dim == 256

    @property
    def bias_code(self) -> int:
        """bwd_kernel.cuh's kBias: 0 none, 1 the bias read, 2 read and its gradient written."""
        return 2 if self.bias_grad else int(self.bias)

    @property
    def _suffix(self) -> str:
        return ("", "bias", "bias_grad")[self.bias_code]

    @property
    def stem(self) -> str:
        return (f"bwd_{self.dtype}_d{self.head_dim}_{self.mask}" + (f"_{self._suffix}" if self.bias else "")
                + ("_dropout" if self.dropout else ""))

    @property
    def label(self) -> str:
        return (f"{self.dtype}/{self.head_dim}/{self.mask}" + (f"/{self._suffix}" if self.bias else "")
                + ("/dropout" if self.dropout else ""))

    @property
    def template_args(self) -> str:
        head_dim = "" if self.own_kernel else f"{self.head_dim}, "
        return (f"{DTYPES[self.dtype]}, {head_dim}{MASKS[self.mask]}, {self.bias_code}, "
                f"{'true' if self.dropout else 'false'}")

    @property
    def function(self) -> str:
        return "run_bwd_d256" if self.own_kernel else "run_bwd"

    def source(self) -> str:
        if self.own_kernel:
            return f'#include "bwd_d256.cuh"\nFLASH_CUTLASS_BWD_D256_INSTANCE({self.template_args})\n'
        header = "bwd_dropout.cuh" if self.dropout else "bwd_kernel.cuh"
        return f'#include "{header}"\nFLASH_CUTLASS_BWD_INSTANCE({self.template_args})\n'


def bwd_instances(head_dim: int, dropout: bool = False) -> tuple:
    """One backward library's instances: dtype x mask x (no bias, bias, bias and its gradient)."""
    biases = ((False, False), (True, False), (True, True))
    return tuple(BwdInstance(d, head_dim, m, b, g, dropout) for d, m, (b, g) in itertools.product(DTYPES, MASKS, biases))


BWD_INSTANCES = bwd_instances(128)
# The same set with dropout, a library of its own (built on the first backward with dropout), so
# that neither build passes 3 minutes on 16 cores.
BWD_DROPOUT_INSTANCES = bwd_instances(128, dropout=True)

# Head-dim buckets of the Ampere family: an input runs the smallest bucket >= its head dim
# (64 and 128 keep the output in registers; 256 is the kernels' generic head-dim path).
AMPERE_HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class AmpereInstance:
    kind: str  # "fwd" or "bwd"
    dtype: str  # a key of DTYPES
    head_dim: int  # a bucket of AMPERE_HEAD_DIMS
    dropout: bool = False  # bwd only: the forward takes dropout at run time, the backward's is compiled in

    @property
    def stem(self) -> str:
        return f"sm80_{self.kind}_{self.dtype}_d{self.head_dim}{'_dropout' if self.dropout else ''}"

    @property
    def template_args(self) -> str:
        args = f"{DTYPES[self.dtype]}, {self.head_dim}"
        return args + (f", {'true' if self.dropout else 'false'}" if self.kind == "bwd" else "")

    def source(self) -> str:
        return f'#include "sm80_{self.kind}.cuh"\nFLASH_CUTLASS_SM80_{self.kind.upper()}({self.template_args})\n'


AMPERE_INSTANCES = tuple(
    [AmpereInstance("fwd", d, h) for d, h in itertools.product(DTYPES, AMPERE_HEAD_DIMS)]
    + [AmpereInstance("bwd", d, h, drop) for d, h, drop in itertools.product(DTYPES, AMPERE_HEAD_DIMS, (False, True))])


class BuildError(RuntimeError):
    """The kernels could not be built or loaded; the message says why and what to do."""


def api_source(instances=INSTANCES) -> str:
    """The C entry point: a switch over the built instances (declared, defined in their units).
    A TMA-bias instance is tried before the softmax-bias one of its kind, when the bias fits it.
    A call with dropout takes only a dropout instance, and one without only one without."""
    def condition(i):
        bias = "bias && flash_cutlass_bias_tma_ok(p)" if i.tma_bias else f"bias == {'true' if i.bias else 'false'}"
        return (f"dtype == {DTYPES[i.dtype]} && p->head_dim == {i.head_dim} && mask == {MASKS[i.mask]} && {bias} && "
                f"dropout == {'true' if i.dropout else 'false'}")

    ordered = sorted(instances, key=lambda i: not i.tma_bias)  # stable: the listing keeps its order
    cases = "\n".join(
        f"  if ({condition(i)})\n    return flash_cutlass::run_fwd<{i.template_args}>(*p, err, err_len);"
        for i in ordered)
    reads = "\n".join(f"  if ({condition(i)}) return {i.bias_read};" for i in ordered)
    listing = "\\n".join(i.label for i in instances)
    return f"""#include <cstdio>
#include "flash_cutlass.h"
namespace flash_cutlass {{
template <int kDtype, int kHeadDim, int kMask, int kBias, bool kDropout>
int run_fwd(FlashCutlassFwdParams const& p, char* err, int err_len);
}}
extern "C" int flash_cutlass_fwd(int32_t dtype, int32_t mask, const FlashCutlassFwdParams* p, char* err, int32_t err_len) {{
  bool bias = p->bias != nullptr, dropout = p->dropout_p > 0.f;
{cases}
  snprintf(err, err_len, "no CUTLASS instance for dtype=%d head_dim=%d mask=%d bias=%d dropout=%d in this library",
           dtype, p->head_dim, mask, int(bias), int(dropout));
  return 1;
}}
extern "C" const char* flash_cutlass_instances(void) {{ return "{listing}"; }}
// How flash_cutlass_fwd would read this call's bias (BiasRead: 0 none, 1 in the softmax, 2 by TMA),
// -1 if no instance takes it; for tools and the tests.
extern "C" int flash_cutlass_bias_read(int32_t dtype, int32_t mask, const FlashCutlassFwdParams* p) {{
  bool bias = p->bias != nullptr, dropout = p->dropout_p > 0.f;
{reads}
  return -1;
}}
"""


def bwd_api_source(instances=BWD_INSTANCES) -> str:
    """The backward library's C entry point: a switch over its instances."""
    cases = "\n".join(
        f"  if (dtype == {DTYPES[i.dtype]} && p->head_dim == {i.head_dim} && mask == {MASKS[i.mask]} && "
        f"bias == {i.bias_code} && dropout == {'true' if i.dropout else 'false'})\n"
        f"    return flash_cutlass::{i.function}<{i.template_args}>(*p, err, err_len);"
        for i in instances)
    listing = "\\n".join(i.label for i in instances)
    # Declared only where called, so the other backward libraries' sources (and cache keys) stay.
    own = ("\ntemplate <int kDtype, int kMask, int kBias, bool kDropout>\n"
           "int run_bwd_d256(FlashCutlassBwdParams const& p, char* err, int err_len);"
           if any(i.own_kernel for i in instances) else "")
    return f"""#include <cstdio>
#include "flash_cutlass_bwd.h"
namespace flash_cutlass {{
template <int kDtype, int kHeadDim, int kMask, int kBias, bool kDropout>
int run_bwd(FlashCutlassBwdParams const& p, char* err, int err_len);{own}
}}
extern "C" int flash_cutlass_bwd(int32_t dtype, int32_t mask, const FlashCutlassBwdParams* p, char* err, int32_t err_len) {{
  int bias = p->bias == nullptr ? 0 : p->dbias == nullptr ? 1 : 2;
  bool dropout = p->dropout_p > 0.f;
{cases}
  snprintf(err, err_len, "no CUTLASS backward for dtype=%d head_dim=%d mask=%d bias=%d (1 read, 2 with its gradient) "
           "dropout=%d in this library", dtype, p->head_dim, mask, bias, int(dropout));
  return 1;
}}
extern "C" const char* flash_cutlass_bwd_instances(void) {{ return "{listing}"; }}
"""


def ampere_api_source(instances=AMPERE_INSTANCES) -> str:
    """The Ampere library's C entry points: each switches over its pass's built instances, by dtype
    and the smallest head-dim bucket that holds the input's head dims."""
    fwd = [i for i in instances if i.kind == "fwd"]
    bwd = [i for i in instances if i.kind == "bwd"]
    buckets = sorted({i.head_dim for i in instances})

    listing = "\\n".join(f"{i.kind}/{i.dtype}/{i.head_dim}{'/dropout' if i.dropout else ''}" for i in instances)
    bucket_chain = " : ".join(f"d <= {b} ? {b}" for b in buckets) + " : -1"
    declarations = """namespace flash_cutlass_sm80 {
template <int kDtype, int kMaxK> int run_fwd(FlashCutlassSm80FwdParams const&, char*, int);
template <int kDtype, int kMaxK> int64_t fwd_accum_bytes(FlashCutlassSm80FwdParams const&);
template <int kDtype, int kMaxK, bool kDropout> int run_bwd(FlashCutlassSm80BwdParams&, char*, int);
template <int kDtype, int kMaxK, bool kDropout> int64_t bwd_workspace(FlashCutlassSm80BwdParams&, int32_t*);
}"""
    return f"""#include <cstdio>
#include "flash_cutlass_sm80.h"
#include "flash_cutlass.h"
{declarations}
static int bucket_of(int d) {{ return {bucket_chain}; }}
extern "C" int flash_cutlass_sm80_fwd(int32_t dtype, const FlashCutlassSm80FwdParams* p, char* err, int32_t err_len) {{
  int bucket = bucket_of(p->head_dim > p->head_dim_v ? p->head_dim : p->head_dim_v);
{_calls(fwd, "run_fwd", "(*p, err, err_len)")}
  snprintf(err, err_len, "no CUTLASS sm80 forward for dtype=%d head_dim=%d", dtype, p->head_dim);
  return 1;
}}
extern "C" int64_t flash_cutlass_sm80_fwd_accum_bytes(int32_t dtype, const FlashCutlassSm80FwdParams* p) {{
  int bucket = bucket_of(p->head_dim > p->head_dim_v ? p->head_dim : p->head_dim_v);
{_calls(fwd, "fwd_accum_bytes", "(*p)")}
  return -1;
}}
extern "C" int flash_cutlass_sm80_bwd(int32_t dtype, FlashCutlassSm80BwdParams* p, char* err, int32_t err_len) {{
  int bucket = bucket_of(p->head_dim > p->head_dim_v ? p->head_dim : p->head_dim_v);
  bool dropout = p->dropout_p > 0.f;
{_calls(bwd, "run_bwd", "(*p, err, err_len)")}
  snprintf(err, err_len, "no CUTLASS sm80 backward for dtype=%d head_dim=%d dropout=%d", dtype, p->head_dim,
           int(dropout));
  return 1;
}}
extern "C" int64_t flash_cutlass_sm80_bwd_workspace(int32_t dtype, FlashCutlassSm80BwdParams* p, int32_t* zero) {{
  int bucket = bucket_of(p->head_dim > p->head_dim_v ? p->head_dim : p->head_dim_v);
  bool dropout = p->dropout_p > 0.f;
{_calls(bwd, "bwd_workspace", "(*p, zero)")}
  return -1;
}}
extern "C" const char* flash_cutlass_sm80_instances(void) {{ return "{listing}"; }}
"""


def _calls(items, function: str, args: str) -> str:
    """`if (<this instance>) return flash_cutlass_sm80::<function><args>;` for each instance."""
    lines = []
    for i in items:
        cond = f"dtype == {DTYPES[i.dtype]} && bucket == {i.head_dim}"
        if i.kind == "bwd":
            cond += f" && dropout == {'true' if i.dropout else 'false'}"
        lines.append(f"  if ({cond})\n    return flash_cutlass_sm80::{function}<{i.template_args}>{args};")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Family:
    """One library: what it is built from, for which GPUs, and its entry point's source."""

    name: str
    lib_name: str
    sources: tuple[str, ...]  # csrc/ files its units include (hashed into the cache key)
    example: str  # the CUTLASS example directory on the include path
    gencode: tuple[str, ...]
    instances: tuple
    api: object  # instances -> the api.cu source
    needs_curand: bool = False  # example 41's dropout draws with curand's (header-only) Philox


HOPPER = Family("hopper", LIB_NAME, SOURCES, "examples/88_hopper_fmha",
                # TMA and wgmma need the arch-specific target (sm_90a), not plain sm_90.
                ("-gencode=arch=compute_90a,code=sm_90a",), INSTANCES, api_source)
HOPPER_DROPOUT = Family("hopper_dropout", DROPOUT_LIB_NAME, SOURCES, "examples/88_hopper_fmha",
                        ("-gencode=arch=compute_90a,code=sm_90a",), DROPOUT_INSTANCES, api_source)
HOPPER_D64 = dataclasses.replace(HOPPER, name="hopper_d64", lib_name="libflash_cutlass_d64.so", instances=D64_INSTANCES)
HOPPER_DROPOUT_D64 = dataclasses.replace(HOPPER_DROPOUT, name="hopper_dropout_d64",
                                         lib_name="libflash_cutlass_dropout_d64.so", instances=D64_DROPOUT_INSTANCES)
_FWD_FAMILIES = {(64, False): HOPPER_D64, (64, True): HOPPER_DROPOUT_D64}


def fwd_family(head_dim: int, dropout: bool = False) -> Family:
    """The forward library that holds this head dim's instances (with or without dropout)."""
    return _FWD_FAMILIES.get((head_dim, dropout), HOPPER_DROPOUT if dropout else HOPPER)


HOPPER_BWD = Family("hopper_bwd", BWD_LIB_NAME, BWD_SOURCES, "examples/88_hopper_fmha",
                    ("-gencode=arch=compute_90a,code=sm_90a",), BWD_INSTANCES, bwd_api_source)
HOPPER_BWD_DROPOUT = Family("hopper_bwd_dropout", BWD_DROPOUT_LIB_NAME, BWD_DROPOUT_SOURCES,
                            "examples/88_hopper_fmha", ("-gencode=arch=compute_90a,code=sm_90a",),
                            BWD_DROPOUT_INSTANCES, bwd_api_source)
# Head dim 64's backward: the same kernels, a library per head dim (BWD_HEAD_DIMS).
HOPPER_BWD_D64 = dataclasses.replace(HOPPER_BWD, name="hopper_bwd_d64", lib_name="libflash_cutlass_bwd_d64.so",
                                     instances=bwd_instances(64))
HOPPER_BWD_DROPOUT_D64 = dataclasses.replace(HOPPER_BWD_DROPOUT, name="hopper_bwd_dropout_d64",
                                             lib_name="libflash_cutlass_bwd_dropout_d64.so",
                                             instances=bwd_instances(64, dropout=True))
# Head dim 256's backward: its own kernel (csrc/bwd_d256.cuh), 24 units, and 24 more with dropout.
HOPPER_BWD_D256 = Family("hopper_bwd_d256", "libflash_cutlass_bwd_d256.so", BWD_D256_SOURCES, "examples/88_hopper_fmha",
                         ("-gencode=arch=compute_90a,code=sm_90a",), bwd_instances(256), bwd_api_source)
HOPPER_BWD_DROPOUT_D256 = dataclasses.replace(HOPPER_BWD_D256, name="hopper_bwd_dropout_d256",
                                              lib_name="libflash_cutlass_bwd_dropout_d256.so",
                                              instances=bwd_instances(256, dropout=True))
_BWD_FAMILIES = {(128, False): HOPPER_BWD, (128, True): HOPPER_BWD_DROPOUT, (64, False): HOPPER_BWD_D64,
                 (64, True): HOPPER_BWD_DROPOUT_D64, (256, False): HOPPER_BWD_D256,
                 (256, True): HOPPER_BWD_DROPOUT_D256}


def bwd_family(head_dim: int, dropout: bool = False) -> Family:
    """The backward library that holds this head dim's instances (with or without dropout)."""
    family = _BWD_FAMILIES.get((head_dim, dropout))
    if family is None:
        raise ValueError(f"no CUTLASS backward library for head_dim={head_dim} (head dims {BWD_HEAD_DIMS})")
    return family


# sm_80 code: SASS for A100-class GPUs and for Hopper (compiled from the same compute_80 PTX),
# and the PTX itself for any later GPU's driver to compile.
AMPERE = Family("ampere", AMPERE_LIB_NAME, AMPERE_SOURCES, "examples/41_fused_multi_head_attention",
                ("-gencode=arch=compute_80,code=[sm_80,sm_90,compute_80]",), AMPERE_INSTANCES, ampere_api_source,
                needs_curand=True)
FAMILIES = {f.name: f for f in (HOPPER, HOPPER_DROPOUT, HOPPER_BWD, HOPPER_BWD_DROPOUT, HOPPER_D64, HOPPER_DROPOUT_D64,
                                 HOPPER_BWD_D64, HOPPER_BWD_DROPOUT_D64, HOPPER_BWD_D256, HOPPER_BWD_DROPOUT_D256,
                                 AMPERE)}


# ---- the toolchain ------------------------------------------------------------------------------


def cutlass_source_dir(family: Family = HOPPER) -> pathlib.Path:
    """The CUTLASS source root holding include/ and the family's example directory."""
    override = os.environ.get("FLASH_INDUCTOR_CUTLASS_DIR")
    if override:
        root = pathlib.Path(override)
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            raise BuildError("the CUTLASS headers are missing: pip install nvidia-cutlass "
                             "(or set FLASH_INDUCTOR_CUTLASS_DIR to a CUTLASS checkout)")
        root = pathlib.Path(list(spec.submodule_search_locations)[0]) / "source"
    example_file = ("kernel_backward.h" if family is AMPERE
                    else "collective/fmha_collective_bwd_tma_warpspecialized.hpp" if family.name.startswith("hopper_bwd")
                    else "collective/fmha_fusion.hpp")
    for need in ("include/cute/tensor.hpp", f"{family.example}/{example_file}"):
        if not (root / need).is_file():
            raise BuildError(f"{root} has no {need}: the CUTLASS sources there are incomplete "
                             "(nvidia-cutlass >= 4.2 ships them)")
    return root


def cutlass_version(root: pathlib.Path) -> str:
    text = (root / "include/cutlass/version.h").read_text()
    parts = []
    for name in ("CUTLASS_MAJOR", "CUTLASS_MINOR", "CUTLASS_PATCH"):
        line = next((ln for ln in text.splitlines() if ln.startswith(f"#define {name} ")), f"#define {name} ?")
        parts.append(line.split()[-1])
    return ".".join(parts)


def find_nvcc() -> str:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        homes.append(CUDA_HOME)
    except Exception:  # torch's helper is a convenience; PATH still works without it
        pass
    for home in filter(None, homes):
        nvcc = pathlib.Path(home) / "bin" / "nvcc"
        if nvcc.is_file():
            return str(nvcc)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise BuildError("nvcc (the CUDA toolkit's compiler) was not found: install the CUDA toolkit "
                         "(12.3 or newer) and set CUDA_HOME")
    return nvcc


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    release = [ln for ln in out.splitlines() if "release" in ln]
    if not release:
        raise BuildError(f"{nvcc} --version printed no release line: {out.strip()[:200]}")
    return release[0].strip()


def find_ninja() -> str:
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_pkg

            candidate = pathlib.Path(ninja_pkg.BIN_DIR) / "ninja"
            ninja = str(candidate) if candidate.is_file() else None
        except ImportError:
            pass
    if ninja is None:
        raise BuildError("ninja was not found: pip install ninja")
    return ninja


def curand_include_dir(nvcc: str) -> pathlib.Path:
    """Where curand_kernel.h is: FLASH_INDUCTOR_CURAND_INCLUDE, the toolkit's include/, or the
    nvidia-curand wheel that CUDA builds of torch install (nvidia/cu13/include, nvidia/curand/include)."""
    override = os.environ.get("FLASH_INDUCTOR_CURAND_INCLUDE")
    candidates = [pathlib.Path(override)] if override else []
    candidates.append(pathlib.Path(nvcc).resolve().parent.parent / "include")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home:
            candidates.append(pathlib.Path(home) / "include")
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(pathlib.Path(base).glob("*/include"))
    for c in candidates:
        if (c / "curand_kernel.h").is_file():
            return c
    raise BuildError("curand_kernel.h (the CUDA toolkit's curand headers, which the sm_80 kernels' dropout "
                     "uses) was not found: install the toolkit's curand component or pip install nvidia-curand")


def nvcc_flags(root: pathlib.Path, family: Family = HOPPER, nvcc: str | None = None) -> list[str]:
    includes = [CSRC, root / "include", root / "tools/util/include", root / family.example]
    if family.needs_curand:
        # Ours first: csrc/aten_shim stands in for the two ATen names the kernels' dropout uses.
        includes = [CSRC / "aten_shim", *includes, curand_include_dir(nvcc or find_nvcc())]
    return [
        "-std=c++17", "-O3", "-DNDEBUG", "--use_fast_math", "--expt-relaxed-constexpr",
        *family.gencode,
        "-Xcompiler=-fPIC", "-Xcompiler=-Wno-psabi",
        # Example 41 has a bool function that ends in a trap without a return (warning 940).
        *(["-diag-suppress=940"] if family.needs_curand else []),
        *(f"-I{p}" for p in includes),
    ]


def cache_root() -> pathlib.Path:
    root = os.environ.get("FLASH_INDUCTOR_CACHE_DIR")
    if root:
        return pathlib.Path(root) / "cutlass"
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "flash_inductor" / "cutlass"


def cache_key(flags: list[str], nvcc_release: str, cutlass_ver: str, instances=None, family: Family = HOPPER) -> str:
    instances = family.instances if instances is None else instances
    h = hashlib.sha256(family.name.encode())
    for name in family.sources:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    h.update(family.api(instances).encode())
    for inst in instances:
        h.update(inst.source().encode())
    # Include directories are machine paths: hash what they hold (the version), not where.
    h.update(" ".join([f for f in flags if not f.startswith("-I")] + list(LINK_FLAGS)).encode())
    h.update(nvcc_release.encode() + cutlass_ver.encode())
    return h.hexdigest()[:16]


def ninja_file(nvcc: str, flags: list[str], instances=INSTANCES, lib_name: str = LIB_NAME) -> str:
    units = ["api"] + [i.stem for i in instances]
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"flags = {' '.join(flags)}",
        "rule cu",
        "  command = $nvcc $flags -c $in -o $out",
        "  description = nvcc $in",
        "rule link",
        f"  command = $nvcc {' '.join(LINK_FLAGS)} $in -o $out",
        "  description = link $out",
    ]
    lines += [f"build {u}.o: cu {u}.cu" for u in units]
    lines += [f"build {lib_name}: link {' '.join(u + '.o' for u in units)}", f"default {lib_name}"]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Plan:
    """Everything a build needs, resolved (and checkable without compiling)."""

    nvcc: str
    ninja: str
    flags: list[str]
    directory: pathlib.Path
    instances: tuple = INSTANCES
    family: Family = HOPPER

    @property
    def library(self) -> pathlib.Path:
        return self.directory / self.family.lib_name


def plan(instances=None, family: Family = HOPPER) -> Plan:
    instances = family.instances if instances is None else instances
    root = cutlass_source_dir(family)
    nvcc = find_nvcc()
    flags = nvcc_flags(root, family, nvcc)
    key = cache_key(flags, nvcc_version(nvcc), cutlass_version(root), instances, family)
    return Plan(nvcc, find_ninja(), flags, cache_root() / key, tuple(instances), family)


def build(p: Plan | None = None, jobs: int | None = None, log=None, family: Family = HOPPER) -> pathlib.Path:
    """Build (or reuse) the library; return its path. Raises BuildError with nvcc's message."""
    import fcntl

    p = p or plan(family=family)
    if p.library.is_file():
        return p.library
    p.directory.mkdir(parents=True, exist_ok=True)
    with open(p.directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if p.library.is_file():
            return p.library
        (p.directory / "api.cu").write_text(p.family.api(p.instances))
        for inst in p.instances:
            (p.directory / f"{inst.stem}.cu").write_text(inst.source())
        (p.directory / "build.ninja").write_text(ninja_file(p.nvcc, p.flags, p.instances, p.family.lib_name))
        if log:
            log(f"building the CUTLASS {p.family.name} kernels ({len(p.instances)} instances) in {p.directory}; "
                "this takes minutes once, `flash-inductor build` does it ahead of time")
        cmd = [p.ninja, "-C", str(p.directory)] + (["-j", str(jobs)] if jobs else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            tail = (res.stdout + res.stderr).strip().splitlines()[-25:]
            (p.directory / "build.log").write_text(res.stdout + res.stderr)
            raise BuildError("the CUTLASS build failed (full log: "
                             f"{p.directory / 'build.log'}):\n" + "\n".join(tail))
    return p.library


_load_lock = threading.Lock()


def load(family: Family, env_var: str, log):
    """(the loaded library, None) or (None, why not) for a backend: built, or found in the cache.
    A failure is one warning with the reason; `env_var`=0 turns the backend off untried."""
    import ctypes

    if os.environ.get(env_var, "1") == "0":
        return None, f"turned off ({env_var}=0)"
    with _load_lock:
        try:
            lib = ctypes.CDLL(str(build(family=family, log=log.warning)))
        except (BuildError, OSError) as e:
            log.warning("CUTLASS %s kernels unavailable, Triton runs instead: %s", family.name, e)
            return None, f"not available ({str(e).splitlines()[0]})"
    return lib, None


def status(family: Family = HOPPER) -> str:
    """One line for `flash-inductor info`; builds nothing."""
    try:
        p = plan(family=family)
    except BuildError as e:
        return f"not available: {e}"
    if p.library.is_file():
        return f"built ({p.library})"
    where = {"hopper": "on an sm_90 GPU (H100/H200)",
             "hopper_dropout": "by the first forward with dropout on an sm_90 GPU",
             "hopper_d64": "by the first forward at head dim 64 that dispatch sends to CUTLASS on an sm_90 GPU",
             "hopper_dropout_d64": "by the first forward with dropout at head dim 64 that dispatch sends to CUTLASS",
             "hopper_bwd": "by the first backward at head dim 128 on an sm_90 GPU",
             "hopper_bwd_dropout": "by the first backward with dropout at head dim 128 on an sm_90 GPU",
             "hopper_bwd_d64": "by the first backward at head dim 64 on an sm_90 GPU",
             "hopper_bwd_dropout_d64": "by the first backward with dropout at head dim 64 on an sm_90 GPU",
             "hopper_bwd_d256": "by the first backward at head dim 256 on an sm_90 GPU",
             "hopper_bwd_dropout_d256": "by the first backward with dropout at head dim 256 on an sm_90 GPU",
             "ampere": "when an input is forced to it (FLASH_INDUCTOR_KERNEL=cutlass_sm80)"}[family.name]
    return (f"not built yet: builds on first use {where}, or ahead of time with "
            f"`flash-inductor build --family {family.name}` (into {p.directory})")


def main(argv=None) -> int:
    """`flash-inductor build`: build the kernels ahead of time and print where they are."""
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="flash-inductor build", description=main.__doc__.split(":", 1)[1].strip())
    ap.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (ninja's default: cores + 2)")
    ap.add_argument("--family", choices=[*FAMILIES, "all"], action="append",
                    help="hopper: the sm_90a forward; hopper_bwd: the sm_90a backward at head dim 128 (by default "
                         "both); hopper_dropout, hopper_bwd_dropout: the sm_90a forward and backward with dropout "
                         "(training with dropout); hopper_d64, hopper_dropout_d64, hopper_bwd_d64, "
                         "hopper_bwd_dropout_d64: the same at head dim 64; hopper_bwd_d256, "
                         "hopper_bwd_dropout_d256: the backward at head dim 256; "
                         "ampere: the sm_80 forward and backward (A100-class GPUs; runs on Hopper too); "
                         "all: every family. May be repeated.")
    ap.add_argument("--print-plan", action="store_true", help="print the toolchain, flags and cache directory; build nothing")
    args = ap.parse_args(argv)
    names = args.family or ["hopper", "hopper_bwd"]
    families = list(FAMILIES.values()) if "all" in names else [FAMILIES[n] for n in dict.fromkeys(names)]
    try:
        for family in families:
            p = plan(family=family)
            if args.print_plan:
                print(f"family: {family.name}\nnvcc: {p.nvcc}\nninja: {p.ninja}\nflags: {' '.join(p.flags)}\n"
                      f"directory: {p.directory}\ninstances: {', '.join(i.stem for i in p.instances)}")
                continue
            t0 = time.perf_counter()
            cached = p.library.is_file()
            lib = build(p, args.jobs, log=lambda m: print(m, file=sys.stderr))
            print(f"{lib} ({'cached' if cached else f'built in {time.perf_counter() - t0:.0f} s'})")
        return 0
    except BuildError as e:
        print(f"flash-inductor build: {e}", file=sys.stderr)
        return 1
