"""Issue 6's (c) taken apart: the GPU kernels of each row of padding.py's part 1, and their time.

    python benchmarks/padding_profile.py [--rows a c c_eager c_no_tiles dense] [--json out.json]

Same batch as padding.py part 1 (16 sequences, lengths uniform in 128..8192, seed 0, H=12, D=128,
bf16, Triton autotuning off). For each row, torch.profiler over 5 forwards, then over 5
forward+backward steps; per kernel name: calls per step and device µs per step. Rows:

- a: the packed op (`attention_varlen`);
- c: the eager-written padded attention compiled with backend="flash" (what padding.py times);
- c_eager: the same padded inputs through `attention(q, k, v, mask)`, uncompiled (the op alone);
- c_no_tiles: c_eager with FLASH_INDUCTOR_MASK_TILES=0 (every tile read, the mask as a bias);
- dense: `attention` on a dense batch of about the same real tokens.

The question it answers: (c) computes Σ N·L score pairs where (a) computes Σ L², a cap of
Σ L² / Σ N·L on its rate counted on real tokens (0.754 for this batch); how much of the rest is
the kernel, the mask's classification, or work around the kernel in the compiled graph.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import torch
import triton
from torch.profiler import ProfilerActivity, profile

os.environ.setdefault("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")

from flash_inductor import attention, attention_varlen  # noqa: E402

STEPS = 5


def kernel_table(fn) -> list[dict]:
    """Per kernel name: calls and device µs per step of fn, longest first."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            fn()
        torch.cuda.synchronize()
    totals = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name][0] += 1
            totals[ev.name][1] += ev.time_range.elapsed_us()
    rows = [dict(kernel=name[:90], calls=c / STEPS, us=t / STEPS) for name, (c, t) in totals.items()]
    return sorted(rows, key=lambda r: -r["us"])


def wall_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=["a", "c", "c_eager", "c_no_tiles", "dense"])
    ap.add_argument("--json")
    args = ap.parse_args()
    h, d, batch, dt, dev = 12, 128, 16, torch.bfloat16, "cuda"
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(128, 8193, (batch,), generator=gen).tolist()
    n = -(-max(lengths) // 64) * 64
    total = sum(lengths)
    leaves = lambda *ts: [t.requires_grad_() for t in ts]  # noqa: E731
    q, k, v = leaves(*(torch.randn(total, h, d, device=dev, dtype=dt) for _ in range(3)))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    qp, kp, vp = leaves(*(torch.randn(batch, h, n, d, device=dev, dtype=dt) for _ in range(3)))
    keep = torch.arange(n, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]
    mask = torch.where(keep, 0.0, torch.finfo(dt).min).to(dt)[:, None, None, :]
    nd = round(total / batch)
    qd, kd, vd = leaves(*(torch.randn(batch, h, nd, d, device=dev, dtype=dt) for _ in range(3)))

    def eager_attention(q, k, v, mask):
        w = torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5 + mask
        return torch.matmul(torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

    compiled = torch.compile(eager_attention, backend="flash")
    calls = {
        "a": (lambda: attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths)), [q, k, v]),
        "c": (lambda: compiled(qp, kp, vp, mask), [qp, kp, vp]),
        "c_eager": (lambda: attention(qp, kp, vp, mask), [qp, kp, vp]),
        "c_no_tiles": (lambda: attention(qp, kp, vp, mask), [qp, kp, vp]),
        "dense": (lambda: attention(qd, kd, vd), [qd, kd, vd]),
    }
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "lengths": lengths, "n": n, "cap": sum(L * L for L in lengths) / sum(n * L for L in lengths)}
    for name in args.rows:
        fn, ls = calls[name]
        dout = torch.randn_like(fn())
        step = lambda: torch.autograd.grad(fn(), ls, dout)  # noqa: E731
        if name == "c_no_tiles":
            os.environ["FLASH_INDUCTOR_MASK_TILES"] = "0"
        try:
            row = dict(fwd_us=wall_us(fn), fwd_bwd_us=wall_us(step), fwd_kernels=kernel_table(fn),
                       fwd_bwd_kernels=kernel_table(step))
        finally:
            os.environ.pop("FLASH_INDUCTOR_MASK_TILES", None)
        out[name] = row
        print(f"== {name}: fwd {row['fwd_us']:.0f} µs, fwd+bwd {row['fwd_bwd_us']:.0f} µs (wall, do_bench median)")
        for part in ("fwd_kernels", "fwd_bwd_kernels"):
            print(f"  {part}: {sum(r['us'] for r in row[part]):.0f} µs of kernels per step")
            for r in row[part][:8]:
                print(f"    {r['us']:9.1f} µs  x{r['calls']:.0f}  {r['kernel']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
