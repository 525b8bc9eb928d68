"""Is a call host-bound? GPU time of the kernel alone against the time per call through the op.

    python benchmarks/host_vs_kernel.py --n 4096 [--d 64] [--causal]

Prints, for one shape: do_bench of `triton_attention.forward` (kernel launches only, back to
back), of `flash_inductor.attention` under no_grad and with inputs that require grad, and the
kernel time torch.profiler attributes to `_attn_fwd`. A call time above the kernel time is
host overhead (Python glue, autotuner, custom-op and autograd dispatch).
"""

import argparse

import torch
import triton.testing

import flash_inductor
from flash_inductor.inputs import validate
from flash_inductor.kernels import triton_attention as ta


def ab_unobserved(q, k, v, qg, kg, vg, causal, rounds, bench):
    """Rows of µs per call, direct path against the op's layers, alternating in one process."""
    from flash_inductor import ops

    direct = ops._unobserved
    calls = {
        "no_grad": lambda: flash_inductor.attention(q, k, v, causal=causal),
        "requires_grad": lambda: flash_inductor.attention(qg, kg, vg, causal=causal),
        "fwd+bwd": lambda: flash_inductor.attention(qg, kg, vg, causal=causal).sum().backward(),
    }
    for r in range(rounds):
        for path, fn in (("direct", direct), ("op", lambda *t: False)):
            ops._unobserved = fn
            try:
                for name, call in calls.items():
                    with torch.no_grad() if name == "no_grad" else torch.enable_grad():
                        us = bench(call)
                    print(f"ab round {r} {path:6s} {name:14s} {us:8.1f} µs")
            finally:
                ops._unobserved = direct


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--ab-rounds", type=int, default=0, help="also time attention() through torch.library "
                    "(ops._unobserved forced False) against the direct eager path, interleaved in this "
                    "process for this many rounds: the host's speed differs between processes")
    ap.add_argument("--profile", action="store_true", help="also print cProfile's top functions over 200 "
                    "calls of triton_attention.forward (where its host time goes)")
    args = ap.parse_args()
    q, k, v = (torch.randn(1, args.heads, args.n, args.d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3  # noqa: E731
    inp = validate(q, k, v, causal=args.causal)
    ta.forward(inp, None)
    rows = {"triton_attention.forward": bench(lambda: ta.forward(inp, None))}
    with torch.no_grad():
        rows["attention() no_grad"] = bench(lambda: flash_inductor.attention(q, k, v, causal=args.causal))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    rows["attention() requires_grad"] = bench(lambda: flash_inductor.attention(qg, kg, vg, causal=args.causal))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            ta.forward(inp, None)
        torch.cuda.synchronize()
    kern = [e for e in prof.key_averages() if "_attn_fwd" in e.key]
    if kern:
        attr = "device_time" if hasattr(kern[0], "device_time") else "cuda_time"
        rows["_attn_fwd kernel (profiler)"] = getattr(kern[0], attr)
    if args.ab_rounds:
        ab_unobserved(q, k, v, qg, kg, vg, args.causal, args.ab_rounds, bench)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(lambda: [ta.forward(inp, None) for _ in range(200)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    best = getattr(ta._attn_fwd, "best_config", None)
    for name, us in rows.items():
        print(f"N={args.n} D={args.d} causal={int(args.causal)} {name:32s} {us:8.1f} µs")
    print("config:", best)


if __name__ == "__main__":
    main()
