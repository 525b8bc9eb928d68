"""Attention kernel benchmark: our kernels against SDPA's backends and FlexAttention, one run.

Rows follow the seed README's tables: (B, H, N, D) = (1, 12, N, 128) for N in --lengths, cases
{none, causal, bias, bias+causal, dropout, bias+causal+dropout}. Forward and backward are timed
separately (median, triton.testing.do_bench); TFLOP/s use flops() below. The bias is a
materialised [B, H, N, N] bf16 tensor, as a learned relative-position bias is.

    python benchmarks/bench_attention.py --lengths 2048 8192 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys

import torch
import torch.nn.functional as F

CASES = ("none", "causal", "bias", "bias+causal", "dropout", "bias+causal+dropout")


def flops(b, h, nq, nk, d, causal: bool, mode: str) -> float:
    """4·B·H·Nq·Nk·D for the two products, halved under causal; backward counted as 2.5× forward."""
    f = 4.0 * b * h * nq * nk * d * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def _inputs(n, d, heads, dtype, case, device="cuda"):
    g = torch.Generator(device=device).manual_seed(n + d)
    q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=dtype, generator=g, requires_grad=True) for _ in range(3))
    bias = None
    if "bias" in case:
        bias = torch.randn(1, heads, n, n, device=device, dtype=dtype, generator=g, requires_grad=True)
    return q, k, v, bias


def _ours(kernel):
    import flash_inductor

    def run(q, k, v, bias, causal, p):
        flash_inductor.config.kernel = kernel
        try:
            return flash_inductor.attention(q, k, v, bias, causal=causal, dropout_p=p)
        finally:
            flash_inductor.config.kernel = None

    return run


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def run(q, k, v, bias, causal, p):
        mask = bias
        if bias is not None and causal:  # SDPA takes a mask or is_causal, not both
            n = q.shape[2]
            tri = torch.ones(n, n, device=q.device, dtype=torch.bool).tril()
            mask = bias.masked_fill(~tri, float("-inf"))
            causal = False
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)

    return run


_flex_cache = {}


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, bias, causal, p):
        if p:
            raise RuntimeError("FlexAttention has no dropout")
        n = q.shape[2]
        key = (n, causal)
        if key not in _flex_cache:
            _flex_cache[key] = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, n, n) if causal else None
        score_mod = None
        if bias is not None:
            def score_mod(s, b, h, qi, kv):
                return s + bias[b, h, qi, kv]
        return compiled(q, k, v, score_mod=score_mod, block_mask=_flex_cache[key])

    return run


PEERS = {
    "triton": lambda: _ours("triton"),
    "sdpa_flash": lambda: _sdpa("flash"),
    "sdpa_cudnn": lambda: _sdpa("cudnn"),
    "sdpa_efficient": lambda: _sdpa("efficient"),
    "flex": _flex,
    "sdpa_math": lambda: _sdpa("math"),
}


def bench_case(name, fn, n, d, heads, dtype, case, do_bench):
    causal = "causal" in case
    p = 0.1 if "dropout" in case else 0.0
    q, k, v, bias = _inputs(n, d, heads, dtype, case)
    leaves = [t for t in (q, k, v, bias) if t is not None]
    try:
        out = fn(q, k, v, bias, causal, p)
    except Exception as e:  # a peer refusing a case is a result, not a failure
        return {"status": "refused", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    dout = torch.randn_like(out)
    fwd_ms = do_bench(lambda: fn(q, k, v, bias, causal, p))
    bwd_ms = do_bench(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))
    torch.cuda.synchronize()
    del out
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    o = fn(q, k, v, bias, causal, p)
    torch.autograd.grad(o, leaves, dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {
        "status": "ok",
        "fwd_ms": fwd_ms,
        "bwd_ms": bwd_ms,
        "fwd_tflops": flops(1, heads, n, n, d, causal, "fwd") / fwd_ms / 1e9,
        "bwd_tflops": flops(1, heads, n, n, d, causal, "bwd") / bwd_ms / 1e9,
        "peak_extra_mib": peak / 2**20,
    }


def ceilings(do_bench):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = do_bench(lambda: a @ a)
    x = torch.empty(2**30 // 2, device="cuda", dtype=torch.bfloat16).normal_()
    cp = do_bench(lambda: x.clone())
    return {"bf16_matmul_tflops": 2 * 8192**3 / mm / 1e9, "copy_tb_s": 2 * x.numel() * 2 / cp / 1e9}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--json", default=None, help="write every measurement here")
    args = ap.parse_args(argv)
    import triton
    import triton.testing

    def do_bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/bench_attention.py"] + (argv or sys.argv[1:])),
        "ceilings": ceilings(do_bench),
    }
    print(json.dumps(meta))
    rows = []
    for n in args.lengths:
        for case in args.cases:
            for peer in args.peers:
                if peer == "sdpa_math" and n > 8192:
                    continue
                res = bench_case(peer, PEERS[peer](), n, args.head_dim, args.heads, torch.bfloat16, case, do_bench)
                row = {"n": n, "d": args.head_dim, "case": case, "peer": peer, **res}
                rows.append(row)
                if res["status"] == "ok":
                    print(f"N={n:5d} {case:20s} {peer:15s} fwd {res['fwd_tflops']:6.1f} bwd {res['bwd_tflops']:6.1f} "
                          f"TFLOP/s  ({res['fwd_ms']:.3f} / {res['bwd_ms']:.3f} ms, peak +{res['peak_extra_mib']:.0f} MiB)",
                          flush=True)
                else:
                    print(f"N={n:5d} {case:20s} {peer:15s} refused: {res['reason']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
