"""Build the CUTLASS bias instances with compile-time variants side by side and time their forwards.

    python benchmarks/cutlass_variants.py [--json out.json]

Each variant is a set of -D flags on csrc/fwd_kernel.cuh; today FLASH_CUTLASS_BIAS_PREFETCH (the
bias softmax loads the next key tile a step ahead; measured 350 vs 337 TFLOP/s at D=128, 485 vs
444 at D=256, bias forward, H200). Other variants were tried the same way and are listed, with
their figures, beside the code they changed (csrc/fwd_kernel.cuh, the bias softmax). Each builds only the bias instances it
times, into its own cache directory, in parallel; the forward is then timed through the backend
(the library swapped in) on the issue's shape, B=1 H=12 N=8192 bf16, per-head bias [1, H, N, N],
and checked against the Triton forward.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import sys
import threading

import torch

from flash_inductor import cutlass_build as cb
from flash_inductor.backends import cutlass as cutlass_backend
from flash_inductor.backends.triton import TritonBackend
from flash_inductor.inputs import validate

VARIANTS = {"prefetch": ["-DFLASH_CUTLASS_BIAS_PREFETCH=1"], "no_prefetch": ["-DFLASH_CUTLASS_BIAS_PREFETCH=0"]}
INSTANCES = tuple(cb.Instance("bf16", d, m, True) for d in (128, 256) for m in ("none", "causal"))


def build_variant(name, extra):
    base = cb.plan(INSTANCES)
    flags = base.flags + extra
    key = cb.cache_key(flags, cb.nvcc_version(base.nvcc), cb.cutlass_version(cb.cutlass_source_dir()), INSTANCES)
    p = dataclasses.replace(base, flags=flags, directory=cb.cache_root() / f"variant-{name}-{key}")
    lib = ctypes.CDLL(str(cb.build(p)))
    lib.flash_cutlass_fwd.restype = ctypes.c_int
    lib.flash_cutlass_fwd.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(cutlass_backend._Params),
                                      ctypes.c_char_p, ctypes.c_int32]
    return lib


def time_ms(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--n", type=int, default=8192)
    args = ap.parse_args(argv)
    libs, errors = {}, {}

    def worker(name, extra):
        try:
            libs[name] = build_variant(name, extra)
        except cb.BuildError as e:
            errors[name] = str(e)

    threads = [threading.Thread(target=worker, args=item) for item in VARIANTS.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, err in errors.items():
        print(f"{name}: build failed: {err}", file=sys.stderr)
    cutlass_backend.UNVALIDATED.clear()
    n, h, rows = args.n, 12, []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for d in (128, 256):
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        bias = torch.randn(1, h, n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
        for causal in (False, True):
            inp = validate(q, k, v, bias, causal=causal)
            ref, _ = TritonBackend().forward(inp, None)
            flops = 4 * h * n * n * d / (2 if causal else 1)
            for name, lib in libs.items():
                cutlass_backend._library = lambda lib=lib: (lib, None)
                out, _ = cutlass_backend.CutlassBackend().forward(inp, None)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = time_ms(lambda: cutlass_backend.CutlassBackend().forward(inp, None))
                row = dict(variant=name, head_dim=d, causal=causal, ms=ms, tflops=flops / ms / 1e9, rel_err_vs_triton=err)
                rows.append(row)
                print(f"D={d} {'bias+causal' if causal else 'bias':12s} {name:12s} {ms * 1e3:8.0f} µs "
                      f"{row['tflops']:6.1f} TFLOP/s  rel err vs Triton {err:.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, errors=errors), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
