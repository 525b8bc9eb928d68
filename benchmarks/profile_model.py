"""Where a compiled model's forward spends its time: torch.profiler over a few steps.

    python benchmarks/profile_model.py --model bert --seq 512 --batch 8 [--backend flash]

Prints the top CUDA kernels and CPU ops, the forward's median time, and (for backend="flash")
whether each attention op was decomposed into Inductor-launched Triton kernels or stayed an
opaque op (flash_inductor.kernels_in_graph logs its decisions at DEBUG).
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from flash_inductor.demo import _median_ms
from flash_inductor.models import build, main_output


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backend", default="flash")
    ap.add_argument("--impl", default="sdpa")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()

    logging.basicConfig()
    logging.getLogger("flash_inductor").setLevel(logging.DEBUG)
    built = build(args.model, size="base", attn_implementation=args.impl, batch=args.batch, seq_len=args.seq,
                  device="cuda", dtype=torch.bfloat16, dropout=None)
    model = built.model.eval()
    torch._dynamo.reset()
    fn = torch.compile(model, backend=args.backend)
    with torch.no_grad():
        for _ in range(3):
            main_output(fn(**built.inputs))
        torch.cuda.synchronize()
        ms = _median_ms(lambda: main_output(fn(**built.inputs)), 20, torch.device("cuda"))
        print(f"{args.model} {args.backend} (mask tiles {'off' if os.environ.get('FLASH_INDUCTOR_MASK_TILES') == '0' else 'on'}): forward {ms:.2f} ms")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                main_output(fn(**built.inputs))
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
