"""Where dropout's time goes in the Triton kernels: the op timed with variants of the keep-mask
function patched in before anything compiles (one variant a process), forward and backward, and
the backward split by kernel.

Session 8 left dropout at 264 / 244 TFLOP/s (fwd / bwd; H100, N=8192, D=128) against 482 / 414
without it, after the draws stopped moving between threads in the forward and dQ kernels. What
is left is Philox's integer work (ten rounds of 32-bit multiplies per 8 draws: per score about as
many integer instructions as the tensor cores take to do the score's two dot products), the dK/dV
kernel's transposed keep bits, or something else. Each variant removes or cheapens one part:

- philox10: the kernels as they are (8 16-bit draws per call, the accumulator's key order).
- philox7: 7 rounds (Random123 lists Philox4x32-7 as passing BigCrush; 10 is its default).
- bytes16: 8-bit draws, 16 per call (p quantised to 1/256, as FlashAttention 2 does), so half
  the calls; keys j = 64a + 32h + 8w + 2c + e take byte 2h + e of word w of call (a, c), which a
  thread holds as it holds the 8 keys of a call now.
- hash: a multiply-xorshift hash per score instead of Philox: not a usable RNG, a ceiling for
  how fast any keep-mask can be (no grouping, so nothing moves between threads in any kernel).
- keysfirst: the same mask; the dK/dV kernel runs the calls in the threads that hold the draws
  on sᵀ instead of transposing the keep bits (4x the Philox rounds there, no layout conversion).

    python benchmarks/dropout_variants.py --variant philox7 --json out.json

Autotuning off (the default configs), bf16, B=1 H=12 D=128 N=8192, p=0.1.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

os.environ.setdefault("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flash_inductor.kernels import triton_attention as ta  # noqa: E402


@triton.jit
def _keep_philox7(philox_seed, philox_offset, bh, offs_q, start_k, drop_threshold,
                  BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, KEYS_FIRST: tl.constexpr):
    spans = start_k // 32 + tl.arange(0, BLOCK_K // 32)
    pair = tl.arange(0, 4)
    groups = spans[None, :, None] * 4 + pair[None, None, :]
    rows = offs_q[:, None, None]
    zero = groups * 0 + rows * 0
    r0, r1, r2, r3 = tl.philox(philox_seed, groups + zero, rows + zero, bh + zero, philox_offset + zero, 7)
    k0 = ta._keep_halves(r0, drop_threshold)
    k1 = ta._keep_halves(r1, drop_threshold)
    k2 = ta._keep_halves(r2, drop_threshold)
    k3 = ta._keep_halves(r3, drop_threshold)
    keep = tl.join(tl.join(k0, k1), tl.join(k2, k3))
    keep = tl.reshape(tl.permute(keep, (0, 1, 5, 4, 2, 3)), [BLOCK_Q, BLOCK_K])
    if KEYS_FIRST:
        keep = tl.trans(keep)
    return keep != 0


@triton.jit
def _keep_bytes(word, threshold8):
    """[.., e, h]: the keep bits of a word's four 8-bit draws, byte 2h + e."""
    word = word.to(tl.uint32, bitcast=True)
    b0 = ((word & 0xFF).to(tl.int32) >= threshold8).to(tl.int8)
    b1 = (((word >> 8) & 0xFF).to(tl.int32) >= threshold8).to(tl.int8)
    b2 = (((word >> 16) & 0xFF).to(tl.int32) >= threshold8).to(tl.int8)
    b3 = ((word >> 24).to(tl.int32) >= threshold8).to(tl.int8)
    return tl.join(tl.join(b0, b1), tl.join(b2, b3))


@triton.jit
def _keep_bytes16(philox_seed, philox_offset, bh, offs_q, start_k, drop_threshold,
                  BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, KEYS_FIRST: tl.constexpr):
    tl.static_assert((BLOCK_K // 64) * 64 == BLOCK_K)
    spans = start_k // 64 + tl.arange(0, BLOCK_K // 64)
    pair = tl.arange(0, 4)
    groups = spans[None, :, None] * 4 + pair[None, None, :]
    rows = offs_q[:, None, None]
    zero = groups * 0 + rows * 0
    r0, r1, r2, r3 = tl.philox(philox_seed, groups + zero, rows + zero, bh + zero, philox_offset + zero)
    threshold8 = drop_threshold >> 8
    k0 = _keep_bytes(r0, threshold8)
    k1 = _keep_bytes(r1, threshold8)
    k2 = _keep_bytes(r2, threshold8)
    k3 = _keep_bytes(r3, threshold8)
    # [q, a, c, e, h, w % 2, w // 2] -> [q, a, h, w // 2, w % 2, c, e] -> [q, 64a + 32h + 8w + 2c + e]
    keep = tl.join(tl.join(k0, k1), tl.join(k2, k3))
    keep = tl.reshape(tl.permute(keep, (0, 1, 4, 6, 5, 2, 3)), [BLOCK_Q, BLOCK_K])
    if KEYS_FIRST:
        keep = tl.trans(keep)
    return keep != 0


@triton.jit
def _keep_hash(philox_seed, philox_offset, bh, offs_q, start_k, drop_threshold,
               BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, KEYS_FIRST: tl.constexpr):
    cols = start_k + tl.arange(0, BLOCK_K)
    if KEYS_FIRST:
        x = cols[:, None].to(tl.uint32) * 0x9E3779B1 + offs_q[None, :].to(tl.uint32) * 0x85EBCA77
    else:
        x = offs_q[:, None].to(tl.uint32) * 0x85EBCA77 + cols[None, :].to(tl.uint32) * 0x9E3779B1
    x = x ^ (philox_seed.to(tl.uint32) + bh.to(tl.uint32) * 0xC2B2AE3D + philox_offset.to(tl.uint32))
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    x = x ^ (x >> 12)
    return (x & 0xFFFF).to(tl.int32) >= drop_threshold


_keep_as_is = ta._dropout_keep


@triton.jit
def _keep_keys_first(philox_seed, philox_offset, bh, offs_q, start_k, drop_threshold,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """The same mask, the dK/dV kernel's [keys, queries] tile built where its threads hold it.

    On sᵀ a thread holds keys j and j + 8 of each 16-key row group, so of a call's 8 keys it
    holds the two with its own e and w in {2h, 2h + 1}; each thread runs the call for its own
    (a, h, c, e, query) and keeps those two draws: 4x the forward's Philox rounds per score, no
    layout conversion (ttgir_probe: 11 -> 4 in dK/dV). Measured slower than moving the bits
    (session 10: dK/dV 3160 against 2691 µs at N=8192)."""
    if KEYS_FIRST:
        a = start_k // 32 + tl.arange(0, BLOCK_K // 32)
        h = tl.arange(0, 2)[None, :, None, None, None]
        c = tl.arange(0, 4)[None, None, :, None, None]
        e = tl.arange(0, 2)[None, None, None, :, None]
        rows = offs_q[None, None, None, None, :]
        groups = a[:, None, None, None, None] * 4 + c
        zero = groups * 0 + h * 0 + e * 0 + rows * 0  # [A, H, C, E, Q]
        r0, r1, r2, r3 = tl.philox(philox_seed, groups + zero, rows + zero, bh + zero, philox_offset + zero)
        first = (h + zero) == 0
        shift = (e + zero).to(tl.uint32) * 16
        word_even = tl.where(first, r0, r2).to(tl.uint32, bitcast=True)  # word 2h
        word_odd = tl.where(first, r1, r3).to(tl.uint32, bitcast=True)  # word 2h + 1
        keep_even = (((word_even >> shift) & 0xFFFF).to(tl.int32) >= drop_threshold).to(tl.int8)
        keep_odd = (((word_odd >> shift) & 0xFFFF).to(tl.int32) >= drop_threshold).to(tl.int8)
        # [A, H, C, E, Q, w % 2] -> [A, H, w % 2, C, E, Q] -> [32a + 16h + 8(w % 2) + 2c + e, Q]
        keep = tl.permute(tl.join(keep_even, keep_odd), (0, 1, 5, 2, 3, 4))
        keep = tl.reshape(keep, [BLOCK_K, BLOCK_Q]) != 0
    else:
        keep = _keep_as_is(philox_seed, philox_offset, bh, offs_q, start_k, drop_threshold, BLOCK_Q, BLOCK_K, False)
    return keep


VARIANTS = {"philox10": None, "philox7": _keep_philox7, "bytes16": _keep_bytes16, "hash": _keep_hash,
            "keysfirst": _keep_keys_first}


def _kernel_times(fn, steps: int = 5) -> dict:
    """Device µs per call, by kernel name, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    times = collections.Counter()
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            times[e.key[:60]] += e.self_device_time_total / steps
    return dict(times.most_common(6))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=VARIANTS, default="philox10")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--cases", nargs="+", default=["none", "dropout", "causal+dropout"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if VARIANTS[args.variant] is not None:
        ta._dropout_keep = VARIANTS[args.variant]  # resolved by the kernels when they first compile

    import flash_inductor
    from flash_inductor.bench import flops

    n, d, h = args.length, args.head_dim, 12
    rows = []
    for case in args.cases:
        p = 0.1 if "dropout" in case else 0.0
        causal = "causal" in case
        g = torch.Generator(device="cuda").manual_seed(n + d)
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
                   for _ in range(3))
        fwd = lambda: flash_inductor.attention(q, k, v, causal=causal, dropout_p=p)  # noqa: E731
        out = fwd()
        dout = torch.randn_like(out)
        bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        kept = None
        if p:  # the rate the keep-mask really has: v = identity columns read it off one row block
            eye = torch.eye(d, device="cuda", dtype=torch.bfloat16).expand(1, h, d, d)
            probe = flash_inductor.attention(q[:, :, :d].detach(), k[:, :, :d].detach(), eye, dropout_p=p)
            kept = (probe != 0).float().mean().item()
        fwd_ms = triton.testing.do_bench(fwd, warmup=25, rep=200)
        bwd_ms = triton.testing.do_bench(bwd, warmup=25, rep=200)
        row = {"variant": args.variant, "case": case, "n": n, "d": d,
               "fwd_us": fwd_ms * 1e3, "bwd_us": bwd_ms * 1e3,
               "fwd_tflops": flops(1, h, n, n, d, causal, "fwd") / fwd_ms / 1e9,
               "bwd_tflops": flops(1, h, n, n, d, causal, "bwd") / bwd_ms / 1e9,
               "kept_fraction": kept, "bwd_kernels_us": _kernel_times(bwd)}
        rows.append(row)
        print(f"{args.variant:9s} {case:15s} fwd {row['fwd_tflops']:6.1f} bwd {row['bwd_tflops']:6.1f} TFLOP/s "
              f"(kept {kept if kept is None else round(kept, 4)}) bwd kernels µs: "
              + ", ".join(f"{k.split('(')[0]} {t:.0f}" for k, t in row["bwd_kernels_us"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
