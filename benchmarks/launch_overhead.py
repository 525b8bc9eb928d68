"""Host-side cost of one attention call, layer by layer: where small shapes lose their time.

Small shapes (BERT-base: B=8, H=12, N=512, D=64) take ~40 µs of GPU time per kernel, so any
host overhead above that shows up end to end. Each row times N back-to-back calls with one
synchronize at the end, so the GPU is never the bottleneck when the host is slower.

    python benchmarks/launch_overhead.py
"""

from __future__ import annotations

import time

import torch

import flash_inductor
from flash_inductor import dispatch
from flash_inductor.inputs import validate
from flash_inductor.kernels import triton_attention


def per_call_us(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    q, k, v = (torch.randn(8, 12, 512, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.zeros(8, 1, 1, 512, device="cuda", dtype=torch.bfloat16)
    inp = validate(q, k, v, mask)
    rows = [
        ("validate()", lambda: validate(q, k, v, mask)),
        ("dispatch.select()", lambda: dispatch.select(inp)),
        ("triton_attention.forward()", lambda: triton_attention.forward(inp, None)),
        ("torch.ops.flash.fwd", lambda: torch.ops.flash.fwd(q, k, v, mask, None, 0, 0.125, 0.0)),
        ("flash_inductor.attention()", lambda: flash_inductor.attention(q, k, v, mask)),
        ("F.scaled_dot_product_attention", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
    ]
    for name, fn in rows:
        print(f"{name:34s} {per_call_us(fn):8.1f} us/call")


if __name__ == "__main__":
    main()
