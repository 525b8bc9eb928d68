"""Profile one attention shape through our op and through SDPA: where does the time go?

    python benchmarks/profile_site.py --batch 8 --heads 12 --seq 512 --head-dim 64 --mask
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton.testing

import flash_inductor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mask", action="store_true", help="a [B, 1, 1, N] additive padding mask")
    a = ap.parse_args()
    q, k, v = (torch.randn(a.batch, a.heads, a.seq, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = None
    if a.mask:
        mask = torch.zeros(a.batch, 1, 1, a.seq, device="cuda", dtype=torch.bfloat16)
        mask[-1, ..., -a.seq // 3:] = torch.finfo(torch.bfloat16).min
    ours = lambda: flash_inductor.attention(q, k, v, mask)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    flop = 4 * a.batch * a.heads * a.seq**2 * a.head_dim
    for name, fn in (("flash_inductor (triton)", ours), ("sdpa", sdpa)):
        out = fn()
        dout = torch.randn_like(out)
        f = triton.testing.do_bench(fn, return_mode="median")
        b = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), return_mode="median")
        print(f"{name:26s} fwd {f * 1e3:8.1f} us ({flop / f / 1e9:6.1f} TFLOP/s)   bwd {b * 1e3:8.1f} us ({2.5 * flop / b / 1e9:6.1f} TFLOP/s)")
    out = ours()
    dout = torch.randn_like(out)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            o = ours()
            torch.autograd.grad(o, (q, k, v), dout)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
