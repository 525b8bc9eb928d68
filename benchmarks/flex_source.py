"""Compile FlexAttention's kernels and ours for one shape, so that both can be read side by side.

Why: with the same tiles (128 × 64, 8 warps, 3 stages) FlexAttention's no-mask forward runs at
1.05× ours on an H100 (benchmarks/RESULTS.md, session 13). The difference is in the code each
kernel compiles to. Run on the GPU machine with TORCH_LOGS=output_code (Flex's generated Triton
source goes to the log) and a TRITON_CACHE_DIR to copy the compiled kernels from (TTGIR, cubin,
their metadata); `gpu_session.sh flex_code` does both. The cubins are then read here with
`cuobjdump -sass` (benchmarks/ttgir_probe.py counts our own kernels the same way).

    TORCH_LOGS=output_code python benchmarks/flex_source.py --length 8192 --head-dim 128
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=12)
    args = ap.parse_args(argv)
    from torch.nn.attention.flex_attention import flex_attention

    import flash_inductor

    shape = (1, args.heads, args.length, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False)
    flex(q, k, v).sum().backward()
    flash_inductor.attention(q, k, v).sum().backward()
    torch.cuda.synchronize()
    print(f"compiled FlexAttention and flash_inductor.attention for {shape}, forward and backward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
