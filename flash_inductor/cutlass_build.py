"""Build the CUTLASS kernels in csrc/ into one shared library, with ninja, on first use; cached.

What is built: one translation unit per instance (dtype × head dim × mask × bias, `INSTANCES`), generated
here as two lines that instantiate `flash_cutlass::run_fwd` from csrc/fwd_kernel.cuh, plus
`api.cu`, the C entry point that switches on the instance. Ninja compiles the units in parallel.

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

def _csrc_dir() -> pathlib.Path:
    """csrc/ of a source checkout (editable install), or the copy a wheel carries in the package."""
    here = pathlib.Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "fwd_kernel.cuh").is_file():
            return candidate
    return here.parent / "csrc"


CSRC = _csrc_dir()
SOURCES = ("flash_cutlass.h", "fwd_kernel.cuh")
LIB_NAME = "libflash_cutlass.so"
# No -lcuda: CUTLASS reaches the driver (TMA descriptors) through cudaGetDriverEntryPoint, so the
# library links only the CUDA runtime (statically, nvcc's default) and loads without a driver stub.
LINK_FLAGS = ("-shared",)

DTYPES = {"fp16": "FLASH_CUTLASS_FP16", "bf16": "FLASH_CUTLASS_BF16"}
MASKS = {"none": "FLASH_CUTLASS_NO_MASK", "causal": "FLASH_CUTLASS_CAUSAL_TOP_LEFT",
         "causal_br": "FLASH_CUTLASS_CAUSAL_BOTTOM_RIGHT", "causal_folded": "FLASH_CUTLASS_CAUSAL_FOLDED"}
# Head dim 64 is not built: the Triton kernel measured faster there (backends/cutlass.py).
HEAD_DIMS = (128, 256)


@dataclasses.dataclass(frozen=True)
class Instance:
    dtype: str  # a key of DTYPES
    head_dim: int
    mask: str  # a key of MASKS
    bias: bool = False  # an additive bias in q's dtype, read in the softmax

    @property
    def stem(self) -> str:
        return f"fwd_{self.dtype}_d{self.head_dim}_{self.mask}{'_bias' if self.bias else ''}"

    @property
    def template_args(self) -> str:
        return f"{DTYPES[self.dtype]}, {self.head_dim}, {MASKS[self.mask]}, {'true' if self.bias else 'false'}"

    def source(self) -> str:
        return f'#include "fwd_kernel.cuh"\nFLASH_CUTLASS_INSTANCE({self.template_args})\n'


INSTANCES = tuple(Instance(d, h, m, b) for d, h, m, b in itertools.product(DTYPES, HEAD_DIMS, MASKS, (False, True)))


class BuildError(RuntimeError):
    """The kernels could not be built or loaded; the message says why and what to do."""


def api_source(instances=INSTANCES) -> str:
    """The C entry point: a switch over the built instances (declared, defined in their units)."""
    cases = "\n".join(
        f"  if (dtype == {DTYPES[i.dtype]} && p->head_dim == {i.head_dim} && mask == {MASKS[i.mask]} && "
        f"bias == {'true' if i.bias else 'false'})\n"
        f"    return flash_cutlass::run_fwd<{i.template_args}>(*p, err, err_len);"
        for i in instances)
    listing = "\\n".join(f"{i.dtype}/{i.head_dim}/{i.mask}{'/bias' if i.bias else ''}" for i in instances)
    return f"""#include <cstdio>
#include "flash_cutlass.h"
namespace flash_cutlass {{
template <int kDtype, int kHeadDim, int kMask, bool kBias>
int run_fwd(FlashCutlassFwdParams const& p, char* err, int err_len);
}}
extern "C" int flash_cutlass_fwd(int32_t dtype, int32_t mask, const FlashCutlassFwdParams* p, char* err, int32_t err_len) {{
  bool bias = p->bias != nullptr;
{cases}
  snprintf(err, err_len, "no CUTLASS instance for dtype=%d head_dim=%d mask=%d bias=%d", dtype, p->head_dim, mask,
           int(bias));
  return 1;
}}
extern "C" const char* flash_cutlass_instances(void) {{ return "{listing}"; }}
"""


# ---- the toolchain ------------------------------------------------------------------------------


def cutlass_source_dir() -> pathlib.Path:
    """The CUTLASS source root holding include/ and examples/88_hopper_fmha/."""
    override = os.environ.get("FLASH_INDUCTOR_CUTLASS_DIR")
    if override:
        root = pathlib.Path(override)
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            raise BuildError("the CUTLASS headers are missing: pip install nvidia-cutlass "
                             "(or set FLASH_INDUCTOR_CUTLASS_DIR to a CUTLASS checkout)")
        root = pathlib.Path(list(spec.submodule_search_locations)[0]) / "source"
    for need in ("include/cute/tensor.hpp", "examples/88_hopper_fmha/collective/fmha_fusion.hpp"):
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


def nvcc_flags(root: pathlib.Path) -> list[str]:
    includes = [CSRC, root / "include", root / "tools/util/include", root / "examples/88_hopper_fmha"]
    return [
        "-std=c++17", "-O3", "-DNDEBUG", "--use_fast_math", "--expt-relaxed-constexpr",
        # TMA and wgmma need the arch-specific target (sm_90a), not plain sm_90.
        "-gencode=arch=compute_90a,code=sm_90a",
        "-Xcompiler=-fPIC", "-Xcompiler=-Wno-psabi",
        *(f"-I{p}" for p in includes),
    ]


def cache_root() -> pathlib.Path:
    root = os.environ.get("FLASH_INDUCTOR_CACHE_DIR")
    if root:
        return pathlib.Path(root) / "cutlass"
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "flash_inductor" / "cutlass"


def cache_key(flags: list[str], nvcc_release: str, cutlass_ver: str, instances=INSTANCES) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    h.update(api_source(instances).encode())
    for inst in instances:
        h.update(inst.source().encode())
    # Include directories are machine paths: hash what they hold (the version), not where.
    h.update(" ".join([f for f in flags if not f.startswith("-I")] + list(LINK_FLAGS)).encode())
    h.update(nvcc_release.encode() + cutlass_ver.encode())
    return h.hexdigest()[:16]


def ninja_file(nvcc: str, flags: list[str], instances=INSTANCES) -> str:
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
    lines += [f"build {LIB_NAME}: link {' '.join(u + '.o' for u in units)}", f"default {LIB_NAME}"]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Plan:
    """Everything a build needs, resolved (and checkable without compiling)."""

    nvcc: str
    ninja: str
    flags: list[str]
    directory: pathlib.Path
    instances: tuple[Instance, ...] = INSTANCES

    @property
    def library(self) -> pathlib.Path:
        return self.directory / LIB_NAME


def plan(instances=INSTANCES) -> Plan:
    root = cutlass_source_dir()
    nvcc = find_nvcc()
    flags = nvcc_flags(root)
    key = cache_key(flags, nvcc_version(nvcc), cutlass_version(root), instances)
    return Plan(nvcc, find_ninja(), flags, cache_root() / key, tuple(instances))


def build(p: Plan | None = None, jobs: int | None = None, log=None) -> pathlib.Path:
    """Build (or reuse) the library; return its path. Raises BuildError with nvcc's message."""
    import fcntl

    p = p or plan()
    if p.library.is_file():
        return p.library
    p.directory.mkdir(parents=True, exist_ok=True)
    with open(p.directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if p.library.is_file():
            return p.library
        (p.directory / "api.cu").write_text(api_source(p.instances))
        for inst in p.instances:
            (p.directory / f"{inst.stem}.cu").write_text(inst.source())
        (p.directory / "build.ninja").write_text(ninja_file(p.nvcc, p.flags, p.instances))
        if log:
            log(f"building the CUTLASS kernels ({len(p.instances)} instances) in {p.directory}; "
                "this takes minutes once, `flash-inductor build` does it ahead of time")
        cmd = [p.ninja, "-C", str(p.directory)] + (["-j", str(jobs)] if jobs else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            tail = (res.stdout + res.stderr).strip().splitlines()[-25:]
            (p.directory / "build.log").write_text(res.stdout + res.stderr)
            raise BuildError("the CUTLASS build failed (full log: "
                             f"{p.directory / 'build.log'}):\n" + "\n".join(tail))
    return p.library


def status() -> str:
    """One line for `flash-inductor info`; builds nothing."""
    try:
        p = plan()
    except BuildError as e:
        return f"not available: {e}"
    if p.library.is_file():
        return f"built ({p.library})"
    return (f"not built yet: builds on first use on an sm_90 GPU (H100/H200), or ahead of time with "
            f"`flash-inductor build` (into {p.directory})")


def main(argv=None) -> int:
    """`flash-inductor build`: build the kernels ahead of time and print where they are."""
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="flash-inductor build", description=main.__doc__.split(":", 1)[1].strip())
    ap.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (ninja's default: cores + 2)")
    ap.add_argument("--print-plan", action="store_true", help="print the toolchain, flags and cache directory; build nothing")
    args = ap.parse_args(argv)
    try:
        p = plan()
        if args.print_plan:
            print(f"nvcc: {p.nvcc}\nninja: {p.ninja}\nflags: {' '.join(p.flags)}\ndirectory: {p.directory}\n"
                  f"instances: {', '.join(i.stem for i in p.instances)}")
            return 0
        t0 = time.perf_counter()
        cached = p.library.is_file()
        lib = build(p, args.jobs, log=lambda m: print(m, file=sys.stderr))
        print(f"{lib} ({'cached' if cached else f'built in {time.perf_counter() - t0:.0f} s'})")
        return 0
    except BuildError as e:
        print(f"flash-inductor build: {e}", file=sys.stderr)
        return 1
