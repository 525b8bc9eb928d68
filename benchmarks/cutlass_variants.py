"""Build the CUTLASS bias instances as variants side by side and time their forwards.

    python benchmarks/cutlass_variants.py [--json out.json] [--variants tma softmax ...]

A variant is a set of instances and -D flags on csrc/: today how head dim 128 reads its bias,
"tma" (csrc/fwd_bias_tma.cuh: a bias tile per key block loaded by TMA into the K/V ring) and its
knobs (`VARIANTS`), against "softmax" (fwd_kernel.cuh's softmax-read bias, the only way before
session 19). Older variants of the softmax-read bias (FLASH_CUTLASS_BIAS_PREFETCH, and those
listed beside its code) were measured the same way. Each builds only the instances it times,
into its own cache directory, in parallel; the forwards are then timed through the backend (the
library swapped in), interleaved (`time_interleaved`), on the issue's shape, B=1 H=12 N=8192
bf16, per-head bias [1, H, N, N], and checked against the Triton forward of the same input.
Variants built without a bias ("no_bias", "overlap_no_bias") time the same q, k, v without it:
the ceiling the bias variants are read against. The d64_* variants are head dim 64's forward
tiles, and the d128_* ones head dim 128's plain forward (persistent, or a CTA per block), timed
without a bias beside the Triton forward and cuDNN's.
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

# Head dim 128's plain instances (no bias, no dropout), which the no-bias variants build.
_D128 = tuple(cb.Instance("bf16", 128, m) for m in ("none", "causal"))


def _bias_instances(tma: bool):
    return tuple(cb.Instance("bf16", 128, m, True, tma) for m in ("none", "causal"))


# name -> (instances, extra nvcc flags)
_OLD_READ = ["-DFLASH_CUTLASS_TMA_BIAS_LDSM=0", "-DFLASH_CUTLASS_TMA_BIAS_EARLY_LOADS=0"]
# Every variant tried (session 19, H100; RESULTS.md): the default is "tma" (ldmatrix reads issued
# before the QK GEMM's wait, 6 ring slots, no L2 prefetch, warpgroups not locked). The bias
# written into the accumulator before the GEMM was tried as a patch
# (benchmarks/patches/tma_bias_init_acc.patch, its header has the figures).
VARIANTS = {
    "tma": (_bias_instances(True), []),
    "softmax": (_bias_instances(False), []),
    "lds": (_bias_instances(True), _OLD_READ),  # 32 swizzled 32-bit loads per tile, after the wait
    "lds_5": (_bias_instances(True), _OLD_READ + ["-DFLASH_CUTLASS_TMA_BIAS_STAGES=5"]),
    "lds_l2_2": (_bias_instances(True), _OLD_READ + ["-DFLASH_CUTLASS_TMA_BIAS_L2_AHEAD=2"]),
    "lds_l2_4": (_bias_instances(True), _OLD_READ + ["-DFLASH_CUTLASS_TMA_BIAS_L2_AHEAD=4"]),
    "lds_early": (_bias_instances(True), ["-DFLASH_CUTLASS_TMA_BIAS_LDSM=0"]),
    "lds_locked": (_bias_instances(True), _OLD_READ + ["-DFLASH_CUTLASS_TMA_BIAS_LOCKED=1"]),
    "ldsm_late": (_bias_instances(True), ["-DFLASH_CUTLASS_TMA_BIAS_EARLY_LOADS=0"]),
    # FA3's intra-warpgroup overlap: correct, and slower (session 20: -12% / -8% with the bias,
    # -12% / -9% without; RESULTS.md), with the bias
    # and, for the no-bias instances, the same loop without one (against "no_bias").
    "overlap": (_bias_instances(True), ["-DFLASH_CUTLASS_TMA_BIAS_OVERLAP=1"]),
    "overlap_no_bias": (_D128,
                        ["-DFLASH_CUTLASS_TMA_BIAS_OVERLAP=1", "-DFLASH_CUTLASS_OVERLAP_NO_BIAS=1",
                         "-DFLASH_CUTLASS_PERSISTENT_D128=0"]),
    "l2_2": (_bias_instances(True), ["-DFLASH_CUTLASS_TMA_BIAS_L2_AHEAD=2"]),
    "l2_4": (_bias_instances(True), ["-DFLASH_CUTLASS_TMA_BIAS_L2_AHEAD=4"]),
    "ldsm_late_locked": (_bias_instances(True), ["-DFLASH_CUTLASS_TMA_BIAS_EARLY_LOADS=0",
                                                 "-DFLASH_CUTLASS_TMA_BIAS_LOCKED=1"]),
    # Diagnostic, wrong results: the bias loaded but not added (what the add itself costs).
    "no_add": (_bias_instances(True), ["-DFLASH_CUTLASS_TMA_BIAS_DIAG_NO_ADD=1"]),
    # The same kernel without a bias (timed on the same q, k, v without it): the ceiling.
    "no_bias": (_D128, []),
    # Diagnostic, wrong results: every step loads the block's first bias tile (L2, not HBM).
    "same_tile": (_bias_instances(True), ["-DFLASH_CUTLASS_TMA_BIAS_DIAG_SAME_TILE=1"]),
}

# Head dim 64's forward tile (csrc/fwd_kernel.cuh's FLASH_CUTLASS_D64_ROWS x _KEYS; 192 x 128 is
# built), timed without a bias beside the Triton forward and cuDNN's.
_D64 = tuple(cb.Instance("bf16", 64, m) for m in ("none", "causal"))
VARIANTS.update({
    f"d64_{rows}x{keys}": (_D64, [f"-DFLASH_CUTLASS_D64_ROWS={rows}", f"-DFLASH_CUTLASS_D64_KEYS={keys}"])
    for rows, keys in ((192, 128), (128, 128), (128, 64), (192, 64))
})

# Head dim 128's plain forward: "d128_base" is the library's code (the example's persistent kernel
# without a mask: csrc/fwd_kernel.cuh's FLASH_CUTLASS_PERSISTENT_D128, where the figures are),
# "d128_individual" a CTA per block as before session 28. "d128_base" builds what "no_bias" does;
# the d128_ name times it beside Triton and cuDNN instead of beside the bias variants. Also tried in session 28 (H200, N=8192,
# no mask, not kept): 128 x 176 and 128 x 192 key blocks with example 88's mainloop as it is (4 K/V
# ring slots, a patch of TileFor): 426 and 595 TFLOP/s against 647, and wrong with causal (the
# example's causal trip count assumes square blocks); the persistent kernel at head dim 64 (no
# gain) and 256 (does not launch).
VARIANTS.update({
    "d128_base": (_D128, []),
    "d128_individual": (_D128, ["-DFLASH_CUTLASS_PERSISTENT_D128=0"]),
})


def build_variant(name, instances, extra):
    base = cb.plan(instances)
    flags = base.flags + extra
    key = cb.cache_key(flags, cb.nvcc_version(base.nvcc), cb.cutlass_version(cb.cutlass_source_dir()), instances)
    p = dataclasses.replace(base, flags=flags, directory=cb.cache_root() / f"variant-{name}-{key}")
    return cutlass_backend.declare(ctypes.CDLL(str(cb.build(p))))


def time_interleaved(fns: dict, reps=20, rounds=7) -> dict:
    """Median ms a call per name, over rounds that each time every fn once (`reps` calls queued
    between two events, so the op's host work overlaps the kernels), in an order rotated every
    round: a GPU whose clocks drift over a run (seen in session 19, same kernel 437-517 TFLOP/s)
    then drifts under every variant alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    names, times = list(fns), {name: [] for name in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            torch.cuda.synchronize()
            start.record()
            for _ in range(reps):
                fns[name]()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / reps)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _use_library(lib):
    """Every forward of the backend then runs `lib` (a variant's), whatever its head dim or dropout."""
    cutlass_backend._library = lambda dropout=False, head_dim=128: (lib, None)


def _time_plain(libs, n, h, d, gen):
    """Variants without a bias, beside the Triton forward and cuDNN's, on no mask and causal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    for causal in (False, True):
        inp = validate(q, k, v, causal=causal)
        ref, _ = TritonBackend().forward(inp, None)

        def call(lib):
            _use_library(lib)
            return cutlass_backend.CutlassBackend().forward(inp, None)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        fns, errs = {}, {}
        for name, lib in libs.items():
            try:
                out = call(lib)[0]
            except RuntimeError as e:  # a variant that does not launch is reported, the others timed
                print(f"D={d} {'causal' if causal else 'none':7s} {name:12s} failed: {e}", flush=True)
                rows.append(dict(variant=name, head_dim=d, causal=causal, error=str(e)))
                continue
            fns[name] = lambda lib=lib: call(lib)
            errs[name] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        fns.update(triton=lambda: TritonBackend().forward(inp, None), sdpa_cudnn=cudnn)
        flops = 4 * h * n * n * d / (2 if causal else 1)
        for name, ms in time_interleaved(fns).items():
            row = dict(variant=name, head_dim=d, causal=causal, ms=ms, tflops=flops / ms / 1e9,
                       rel_err_vs_triton=errs.get(name))
            rows.append(row)
            err = f"  rel err vs Triton {errs[name]:.2e}" if name in errs else ""
            print(f"D={d} {'causal' if causal else 'none':7s} {name:12s} {ms * 1e3:8.0f} µs "
                  f"{row['tflops']:6.1f} TFLOP/s{err}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    libs, errors = {}, {}

    def worker(name, instances, extra):
        try:
            libs[name] = build_variant(name, instances, extra)
        except cb.BuildError as e:
            errors[name] = str(e)

    threads = [threading.Thread(target=worker, args=(name, *VARIANTS[name])) for name in args.variants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, err in errors.items():
        print(f"{name}: build failed: {err}", file=sys.stderr)
    cutlass_backend.UNVALIDATED.clear()
    n, h, rows = args.n, 12, []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for d, prefix in ((64, "d64_"), (128, "d128_")):
        plain = {name: lib for name, lib in libs.items() if name.startswith(prefix)}
        if plain:
            rows += _time_plain(plain, n, h, d, gen)
        libs = {name: lib for name, lib in libs.items() if name not in plain}
    for d in (128,) if libs else ():
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        bias = torch.randn(1, h, n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
        for causal in (False, True):
            inp = validate(q, k, v, bias, causal=causal)
            ref, _ = TritonBackend().forward(inp, None)
            plain = validate(q, k, v, causal=causal)
            ref_plain, _ = TritonBackend().forward(plain, None)
            flops = 4 * h * n * n * d / (2 if causal else 1)

            def call(lib, run):
                _use_library(lib)
                return cutlass_backend.CutlassBackend().forward(run, None)

            runs = {name: inp if VARIANTS[name][0][0].bias else plain for name in libs}
            fns = {name: (lambda lib=lib, run=runs[name]: call(lib, run)) for name, lib in libs.items()}
            checks = {}
            for name, lib in libs.items():
                _use_library(lib)
                read = cutlass_backend.CutlassBackend().bias_read(runs[name])
                out, _ = fns[name]()
                want = ref if runs[name] is inp else ref_plain
                checks[name] = (read, ((out.float() - want.float()).norm() / want.float().norm()).item())
            for name, ms in time_interleaved(fns).items():
                read, err = checks[name]
                row = dict(variant=name, bias_read=read, head_dim=d, causal=causal, ms=ms, tflops=flops / ms / 1e9,
                           rel_err_vs_triton=err)
                rows.append(row)
                print(f"D={d} {'bias+causal' if causal else 'bias':12s} {name:8s} ({read}) {ms * 1e3:8.0f} µs "
                      f"{row['tflops']:6.1f} TFLOP/s  rel err vs Triton {err:.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, errors=errors), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
