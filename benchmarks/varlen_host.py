"""Issue 6's packed forward: kernel time against the op's wall time, beside the dense kernel.

    python benchmarks/varlen_host.py --json out.json

Same batch as benchmarks/padding.py part 1 (16 sequences, lengths uniform in 128..8192, seed 0,
H=12, D=128, bf16, Triton autotuning off). Rows, forward only, medians of do_bench:

- dense_op: `attention` on a dense batch of about the same real tokens (B=16, N=mean length);
- varlen_op: `attention_varlen`, the offsets tensor reused (checked on the host once);
- varlen_op_fresh_offsets: the same with a new offsets tensor per call (a host read each call,
  what every call paid before session 17);
- varlen_kernel: `triton_attention.forward_varlen` called directly (no op, no check);
- dense_kernel: `triton_attention.forward` called directly.

Each row also gets the rate on real tokens and the ratio to its dense counterpart, to separate
what the kernel loses on a ragged batch from what the op's host side adds.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

os.environ.setdefault("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")

from flash_inductor import attention, attention_varlen  # noqa: E402
from flash_inductor.inputs import validate  # noqa: E402
from flash_inductor.kernels import triton_attention  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    h, d, batch, dt, dev = 12, 128, 16, torch.bfloat16, "cuda"
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(128, 8193, (batch,), generator=gen).tolist()
    total, mean = sum(lengths), round(sum(lengths) / batch)
    flop_varlen = 4 * h * d * sum(L * L for L in lengths)
    flop_dense = 4 * h * d * batch * mean * mean
    q, k, v = (torch.randn(total, h, d, device=dev, dtype=dt) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    qd, kd, vd = (torch.randn(batch, h, mean, d, device=dev, dtype=dt) for _ in range(3))
    scale = d ** -0.5
    rows = {
        "dense_op": (bench(lambda: attention(qd, kd, vd)), flop_dense),
        "dense_kernel": (bench(lambda: triton_attention.forward(validate(qd, kd, vd), None)), flop_dense),
        "varlen_op": (bench(lambda: attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths))), flop_varlen),
        "varlen_op_fresh_offsets": (bench(lambda: attention_varlen(q, k, v, cu.clone(), cu.clone(), max(lengths),
                                                                   max(lengths))), flop_varlen),
        "varlen_kernel": (bench(lambda: triton_attention.forward_varlen(q, k, v, cu, cu, max(lengths), max(lengths), 0,
                                                                        scale, 0.0, None)), flop_varlen),
    }
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "lengths": lengths, "mean": mean}
    for name, (us, flop) in rows.items():
        out[name] = {"fwd_us": us, "fwd_tflops": flop / (us * 1e-6) / 1e12}
    for name, dense in (("varlen_op", "dense_op"), ("varlen_op_fresh_offsets", "dense_op"),
                        ("varlen_kernel", "dense_kernel")):
        out[name]["of_dense"] = out[name]["fwd_tflops"] / out[dense]["fwd_tflops"]
    for name in rows:
        r = out[name]
        extra = f"  {r['of_dense']:.1%} of dense" if "of_dense" in r else ""
        print(f"{name:<26} {r['fwd_us']:9.1f} µs {r['fwd_tflops']:7.1f} TFLOP/s{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
