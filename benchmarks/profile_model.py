"""Where a compiled model's step spends its time: torch.profiler (device) or cProfile (host).

    python benchmarks/profile_model.py --model bert --seq 512 --batch 8 [--backend flash]
    python benchmarks/profile_model.py --model bert --host [--train]     # host time, cProfile

Device mode prints the top CUDA kernels and CPU ops, the forward's median time, and (for
backend="flash") whether each attention op was decomposed into Inductor-launched Triton kernels
or stayed an opaque op (flash_inductor.kernels_in_graph logs its decisions at DEBUG).

Host mode: on the lent GPU hosts every compiled model at BERT size is host-bound (e2e_models.py's
breakdown: the kernels take a third of the host time or less), so the end-to-end race is won or
lost on the host. It prints the Python functions that spend it, over `--steps` steps with no
device sync inside them.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import time

import torch

from flash_inductor.demo import _median_ms
from flash_inductor.models import build, main_output


def _host_profile(step, steps: int, rows: int, label: str):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    prof, host = cProfile.Profile(), 0.0
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prof.enable()
        step()
        prof.disable()
        host += time.perf_counter() - t0
    torch.cuda.synchronize()
    print(f"{label}: host {host / steps * 1e3:.2f} ms per step (under cProfile, which inflates it)")
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(rows)
        print(s.getvalue())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backend", default="flash")
    ap.add_argument("--impl", default="sdpa")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--host", action="store_true", help="cProfile of the host instead of torch.profiler")
    ap.add_argument("--train", action="store_true", help="a training step (forward, backward of a scalar loss) instead of a no_grad forward")
    ap.add_argument("--steps", type=int, default=20, help="(--host) steps profiled")
    args = ap.parse_args()

    logging.basicConfig()
    if not args.host:
        logging.getLogger("flash_inductor").setLevel(logging.DEBUG)
    built = build(args.model, size="base", attn_implementation=args.impl, batch=args.batch, seq_len=args.seq,
                  device="cuda", dtype=torch.bfloat16, dropout=None)
    model = built.model.train(args.train)
    torch._dynamo.reset()
    fn = torch.compile(model, backend=args.backend)
    def step():
        if args.train:
            main_output(fn(**built.inputs)).float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                main_output(fn(**built.inputs))

    mode = "train" if args.train else "forward"
    if args.host:
        return _host_profile(step, args.steps, args.rows, f"{args.model} {args.backend} {mode}")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    ms = _median_ms(step, 20, torch.device("cuda"))
    print(f"{args.model} {args.backend} (mask tiles {'off' if os.environ.get('FLASH_INDUCTOR_MASK_TILES') == '0' else 'on'}): {mode} {ms:.2f} ms")
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
    # Every device kernel and copy with its launches per step: two backends' lists, diffed, name
    # the launches one adds (e2e_models.py counts them but cannot say which).
    print(f"launches per step ({mode}):")
    for ev in sorted(prof.key_averages(), key=lambda e: e.key):
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.count:
            print(f"  {ev.count / steps:7.1f}  {ev.device_time_total / steps:9.1f} us  {ev.key[:110]}")

if __name__ == "__main__":
    main()
