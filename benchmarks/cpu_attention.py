"""CPU: the reference against PyTorch's fused CPU kernel (our aten_cpu backend) and eager attention.

    python benchmarks/cpu_attention.py

One BERT-size call, B=2 H=12 N=128 D=64 float32 with a padding mask, forward only; the median of
20 calls after a warm-up, on whatever CPU runs it (the figures in RESULTS.md name theirs).
"""

import statistics
import time

import torch

from flash_inductor import dispatch
from flash_inductor.inputs import validate


def median_ms(fn, n=20):
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 12, 128, 64) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 128)
    mask[1, ..., 80:] = torch.finfo(torch.float32).min
    inp = validate(q, k, v, mask)
    rows = {
        "reference backend": lambda: dispatch.BY_NAME["reference"].forward(inp, None),
        "aten_cpu backend": lambda: dispatch.BY_NAME["aten_cpu"].forward(inp, None),
        "eager softmax(q·kᵀ/8 + mask)·v": lambda: torch.softmax(q @ k.transpose(-1, -2) / 8 + mask, -1) @ v,
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, fn in rows.items():
        print(f"{name:34s} {median_ms(fn):7.2f} ms")


if __name__ == "__main__":
    main()
