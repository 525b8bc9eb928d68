"""Time the CUTLASS backward beside Triton's and cuDNN's on issue 4's shape.

    python benchmarks/cutlass_bwd_time.py [--json out.json] [--lengths 8192] [--head-dim 128]
                                          [--variant NAME=-DFLAG=1[,-DFLAG2=0]] ...
                                          [--once]   (one CUTLASS backward per case, untimed: for ncu)

B=1 H=12 bf16, no mask and causal (with --bias: a per-head bias that needs no gradient; with
--bias-grad: one that does, its gradient in every kernel's backward; with --dropout P: dropout at
rate P, CUTLASS and Triton redrawing one seed's mask, cuDNN its own). Every backward starts from the same out and lse (the Triton
forward's: the op's contract, so this needs no forward library) and is timed interleaved
(`time_interleaved`: rounds in rotated order, so a clock drift hits all alike). cuDNN's backward
is `torch.autograd.grad` through its SDPA forward, graph retained. TFLOP/s count the backward as
2.5 forwards (benchmarks/RESULTS.md). The CUTLASS gradients are checked against Triton's first.
A variant is the backward's bf16 instances of the head dim (with --bias / --bias-grad, those
instances) built with extra -D flags into a library of its own (as benchmarks/cutlass_variants.py does for the forward), timed beside them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import ctypes
import dataclasses

from cutlass_variants import time_interleaved
from flash_inductor import cutlass_build as cb
from flash_inductor.backends import cutlass as cutlass_backend
from flash_inductor.backends.triton import TritonBackend
from flash_inductor.bench import flops
from flash_inductor.inputs import validate


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def build_variant(name, head_dim, flags, bias=False, bias_grad=False, dropout=False):
    family = cb.bwd_family(head_dim, dropout)
    instances = tuple(cb.BwdInstance("bf16", head_dim, m, bias, bias_grad, dropout) for m in ("none", "causal"))
    base = cb.plan(instances, family=family)
    all_flags = base.flags + flags
    key = cb.cache_key(all_flags, cb.nvcc_version(base.nvcc), cb.cutlass_version(cb.cutlass_source_dir(family)),
                       instances, family)
    p = dataclasses.replace(base, flags=all_flags, directory=cb.cache_root() / f"bwd-variant-{name}-{key}")
    return cutlass_backend.declare_bwd(ctypes.CDLL(str(cb.build(p))))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--variant", action="append", default=[], help="NAME=-DFLAG=VALUE[,...]")
    ap.add_argument("--bias", action="store_true", help="a per-head bias [1, H, N, N] without gradient (the bench's)")
    ap.add_argument("--bias-grad", action="store_true", help="the same bias, requiring its gradient")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout rate (the dropout library's instances)")
    ap.add_argument("--variants-only", action="store_true",
                    help="time the variants, Triton and cuDNN, not the family's library (which then is not built)")
    ap.add_argument("--once", action="store_true",
                    help="run the CUTLASS backward once per case and stop (a profiler's run: nothing timed)")
    args = ap.parse_args(argv)
    args.bias = args.bias or args.bias_grad
    cutlass_backend.UNVALIDATED.clear()  # a timing, not a dispatch: before its tests pass too
    cutlass_backend.SLOWER_THAN_TRITON.clear()  # and where dispatch prefers Triton
    cutlass, triton = cutlass_backend.CutlassBackend(), TritonBackend()
    # Built side by side (each a few units; ninja per variant), as cutlass_variants.py does.
    specs = [spec.split("=", 1) for spec in args.variant]
    with concurrent.futures.ThreadPoolExecutor(max(1, len(specs))) as pool:
        built = [pool.submit(build_variant, name, args.head_dim, flags.split(","), args.bias, args.bias_grad,
                             args.dropout > 0)
                 for name, flags in specs]
        variants = {name: f.result() for (name, _), f in zip(specs, built)}

    def with_library(lib, fn):
        def run():
            saved = cutlass_backend._bwd_library
            cutlass_backend._bwd_library = lambda dropout=False, head_dim=128: (lib, None)
            try:
                return fn()
            finally:
                cutlass_backend._bwd_library = saved
        return run

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in args.lengths:
        for causal in (False, True):
            q, k, v = (torch.randn(1, 12, n, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                       for _ in range(3))
            bias = (torch.randn(1, 12, n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
                    if args.bias else None)
            inp = validate(q, k, v, bias, causal=causal, dropout_p=args.dropout)
            if not args.variants_only:
                assert cutlass.backward_kernel(inp) == "cutlass", cutlass.backward_reasons(inp)
            seed = (torch.randint(-2**62, 2**62, (2,), device="cuda", dtype=torch.int64, generator=gen)
                    if args.dropout else None)
            out, lse = triton.forward(inp, seed)
            dout = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=gen)
            grad = args.bias_grad
            names = ("dq", "dk", "dv", "dbias") if grad else ("dq", "dk", "dv")
            run_cutlass = lambda: cutlass.backward(inp, seed, out, lse, dout, None, grad)  # noqa: E731
            if args.once:
                run_cutlass()
                torch.cuda.synchronize()
                print(f"N={n} causal={causal} bias={args.bias} grad={grad}: one CUTLASS backward", flush=True)
                continue
            want = triton.backward(inp, seed, out, lse, dout, None, grad)[:len(names)]
            errs = {} if args.variants_only else {
                "cutlass": {name: _rel(g, w) for name, g, w in zip(names, run_cutlass(), want)}}
            for name, lib in variants.items():
                got = with_library(lib, run_cutlass)()
                errs[name] = {g_name: _rel(g, w) for g_name, g, w in zip(names, got, want)}
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            mask = bias
            if bias is not None and causal:
                mask = bias.masked_fill(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
            if grad:
                mask = mask.detach().requires_grad_()
                leaves.append(mask)
            fns = {
                **({} if args.variants_only else {"cutlass": run_cutlass}),
                **{name: with_library(lib, run_cutlass) for name, lib in variants.items()},
                "triton": lambda: triton.backward(inp, seed, out, lse, dout, None, grad),
            }
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    o_cudnn = torch.nn.functional.scaled_dot_product_attention(
                        *leaves[:3], attn_mask=mask, is_causal=causal and bias is None, dropout_p=args.dropout)
                torch.autograd.grad(o_cudnn, leaves, dout, retain_graph=True)
                fns["sdpa_cudnn"] = lambda: torch.autograd.grad(o_cudnn, leaves, dout, retain_graph=True)
            except RuntimeError as e:  # cuDNN refuses some bias gradients: then it is not in the row
                print(f"sdpa_cudnn: {str(e).splitlines()[0][:160]}", flush=True)
            ms = time_interleaved(fns, reps=10, rounds=7)
            work = flops(1, 12, n, n, args.head_dim, causal, "bwd")
            for name, t in ms.items():
                row = {"n": n, "head_dim": args.head_dim, "causal": causal, "kernel": name, "ms": t,
                       "tflops": work / t / 1e9, "rel_err_vs_triton": errs.get(name)}
                row["bias"] = "grad" if args.bias_grad else args.bias
                row["dropout"] = args.dropout
                rows.append(row)
                err = row["rel_err_vs_triton"]
                print(f"N={n} D={args.head_dim} causal={causal!s:5} {name:12} {t * 1e3:7.0f} µs "
                      f"{row['tflops']:6.1f} TFLOP/s"
                      + (" rel err vs Triton " + " ".join(f"{k} {e:.1e}" for k, e in err.items()) if err else ""),
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
