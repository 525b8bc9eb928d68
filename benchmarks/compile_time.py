"""Where the first call of a compiled HF model spends its time, from cold caches.

e2e_models.py records each backend's first call (a no_grad forward, then a training step): on an
H100 host GPT-2 medium took 19 s under backend="inductor" and 144 s under backend="flash"
(session 11), BERT 38 s and 63 s. This script runs one backend in a fresh process with empty
Triton and Inductor caches, and prints the wall time of each first call, Dynamo's per-phase
compile times and a cProfile of the main process sorted by cumulative time, printed after each
call. Triton compiles the kernels in Inductor's worker processes, so their time shows there as
`async_compile.wait`.

    python benchmarks/compile_time.py --model gpt2-medium --seq 1024 --batch 4 --backend flash
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time


def _fresh_caches():
    root = tempfile.mkdtemp(prefix="compile_time_")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(root, "triton")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    os.environ["FLASH_INDUCTOR_CACHE_DIR"] = os.path.join(root, "flash_inductor")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-medium")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--backend", default="flash")
    ap.add_argument("--impl", default="sdpa")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--callers", default=None, metavar="REGEX",
                    help="also print who calls the functions matching REGEX (e.g. 'library.py')")
    ap.add_argument("--keep-caches", action="store_true", help="use the caches the environment names")
    args = ap.parse_args()
    if not args.keep_caches:
        _fresh_caches()

    import torch

    from flash_inductor.models import build, main_output

    built = build(args.model, size="base", attn_implementation=args.impl, batch=args.batch, seq_len=args.seq,
                  device="cuda", dtype=torch.bfloat16, dropout=None)
    model = built.model
    fn = torch.compile(model, backend=args.backend)

    def forward():
        model.eval()
        with torch.no_grad():
            main_output(fn(**built.inputs))

    def train():
        model.train()
        main_output(fn(**built.inputs)).float().pow(2).mean().backward()

    from torch._dynamo.utils import counters

    for label, step in (("forward", forward), ("train", train)):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        step()
        torch.cuda.synchronize()
        prof.disable()
        print(f"{args.model} {args.backend}: first {label} call {time.perf_counter() - t0:.1f} s", flush=True)
        ours = dict(counters["flash_inductor"])
        print(f"  kernel analyses: {ours.get('kernel_analysis_misses', 0)} run, {ours.get('kernel_analysis_hits', 0)} memoised")
        s = io.StringIO()
        stats = pstats.Stats(prof, stream=s).sort_stats("cumulative")
        stats.print_stats(args.rows)
        if args.callers:
            stats.print_callers(args.callers)
        print(s.getvalue(), flush=True)  # per step: a step cut short by a timeout keeps the first
    print(torch._dynamo.utils.compile_times(repr="str", aggregate=True))


if __name__ == "__main__":
    main()
