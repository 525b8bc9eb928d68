"""Attention kernel benchmark: our kernels against SDPA's backends, FlexAttention and eager.

The seed README's tables: rows (B, H, N, D) = (1, 12, N, 128) for N in --lengths, each with
dropout p in {0, 0.1} × bias in {no, yes} × causal in {no, yes}; forward, backward and
forward+backward times in µs (medians of triton.testing.do_bench, or with --timing device the
GPU time of the call's kernels from torch.profiler), TFLOP/s, and the peak
extra memory of one forward+backward. Every peer runs in the same process on the same inputs:

- triton: our op with the Triton kernels forced (FLASH_INDUCTOR_KERNEL=triton), called eagerly;
- cutlass / cutlass_compiled: the same two ways with the CUTLASS kernels forced (its backward
  is Triton's where the CUTLASS backward does not take the input: head dim 256; what it
  refuses, mask-like biases and short head-dim-64 inputs today, the table shows as "refused");
- flash / flash_compiled: the op, eagerly and under torch.compile, with dispatch left to choose,
  nothing forced (the second is exactly what `backend="flash"` does);
- triton_compiled: the same op under torch.compile (how backend="flash" runs it: Inductor
  launches the kernels, no eager dispatch or autograd overhead per call);
- sdpa_flash / sdpa_efficient / sdpa_cudnn / sdpa_math: F.scaled_dot_product_attention with
  one backend forced (bias + causal is passed as one float mask: SDPA takes one or the other);
- flex: FlexAttention, compiled once per case, a block mask for causal and a score_mod that
  reads the bias (it has no dropout);
- eager: softmax(q·kᵀ·scale + bias) · v written out in PyTorch, as unfused models do.

The softcap cases cap the scaled scores at 50·tanh(s / 50) before bias and mask (Gemma 2's
logit soft-capping; its head dim is 256: pass --head-dim 256): FlexAttention does it in its
score_mod, eager writes it out, SDPA cannot (refused).

The bias is a materialised [1, H, N, N] tensor in q's dtype, as a learned relative-position
bias is. By default it does not require grad (the peers' table in DESIGN.md was measured so:
SDPA refuses a bias that does); --bias-grad makes it require grad.

    flash-inductor bench --lengths 8192 --json out.json
    python benchmarks/bench_attention.py ...   (the same)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform
import sys

import torch
import torch.nn.functional as F

CASES = (
    "none", "causal", "bias", "bias+causal",
    "dropout", "causal+dropout", "bias+dropout", "bias+causal+dropout",
    "softcap", "causal+softcap",
)
SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping


def flops(b, h, nq, nk, d, causal: bool, mode: str) -> float:
    """4·B·H·Nq·Nk·D for the two products, halved under causal; backward counted as 2.5× forward."""
    f = 4.0 * b * h * nq * nk * d * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def _inputs(n, d, heads, dtype, case, bias_grad, device="cuda"):
    g = torch.Generator(device=device).manual_seed(n + d)
    q, k, v = (
        torch.randn(1, heads, n, d, device=device, dtype=dtype, generator=g, requires_grad=True)
        for _ in range(3)
    )
    bias = None
    if "bias" in case:
        bias = torch.randn(1, heads, n, n, device=device, dtype=dtype, generator=g, requires_grad=bias_grad)
    return q, k, v, bias


def _ours(kernel):
    import flash_inductor

    def run(q, k, v, bias, causal, p, cap=0.0):
        flash_inductor.config.kernel = kernel
        try:
            return flash_inductor.attention(q, k, v, bias, causal=causal, dropout_p=p, softcap=cap or None)
        finally:
            flash_inductor.config.kernel = None

    return run


def _ours_compiled(kernel):
    """Our op as a compiled model runs it, with `kernel` forced: Triton's kernels are launched by
    Inductor itself (flash_inductor.kernels_in_graph), without the eager op's Python and autograd
    overhead; a CUTLASS forward stays one opaque op in the graph. Compiled once per case, as
    FlexAttention is."""
    import flash_inductor

    compiled = {}

    def run(q, k, v, bias, causal, p, cap=0.0):
        key = (q.shape, bias is not None and bias.requires_grad, causal, p, cap)
        if kernel is not None:  # read when tracing and, for an opaque op, when running
            flash_inductor.config.kernel = kernel
        try:
            if key not in compiled:
                # max-autotune: Triton's kernels tune their configs, as the eager op's do
                # (kernels_in_graph.py tunes in a graph only under max_autotune).
                compiled[key] = torch.compile(
                    lambda q, k, v, bias: flash_inductor.attention(q, k, v, bias, causal=causal, dropout_p=p,
                                                                   softcap=cap or None),
                    dynamic=False, mode="max-autotune-no-cudagraphs",
                )
            return compiled[key](q, k, v, bias)
        finally:
            if kernel is not None:
                flash_inductor.config.kernel = None

    return run


def _bias_and_causal_as_mask(q, bias, causal):
    n = q.shape[2]
    tri = torch.ones(n, n, device=q.device, dtype=torch.bool).tril()
    return bias.masked_fill(~tri, float("-inf"))


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def run(q, k, v, bias, causal, p, cap=0.0):
        if cap:
            raise RuntimeError("SDPA has no soft-capping")
        mask = bias
        if bias is not None and causal:  # SDPA takes a mask or is_causal, not both
            mask, causal = _bias_and_causal_as_mask(q, bias, causal), False
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)

    return run


def _eager():
    def run(q, k, v, bias, causal, p, cap=0.0):
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if cap:
            s = torch.tanh(s / cap) * cap
        if bias is not None:
            s = s + bias
        if causal:
            n = q.shape[2]
            s = s.masked_fill(~torch.ones(n, n, device=q.device, dtype=torch.bool).tril(), float("-inf"))
        a = torch.softmax(s.float(), dim=-1).to(q.dtype)
        return F.dropout(a, p) @ v

    return run


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    block_masks = {}

    def run(q, k, v, bias, causal, p, cap=0.0):
        if p:
            raise RuntimeError("FlexAttention has no dropout")
        n = q.shape[2]
        if causal and n not in block_masks:
            block_masks[n] = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, n, n)
        score_mod = None
        if bias is not None and cap:
            def score_mod(s, b, h, qi, kv):
                return torch.tanh(s / cap) * cap + bias[b, h, qi, kv]
        elif bias is not None:
            def score_mod(s, b, h, qi, kv):
                return s + bias[b, h, qi, kv]
        elif cap:
            def score_mod(s, b, h, qi, kv):
                return torch.tanh(s / cap) * cap
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_masks[n] if causal else None)

    return run


PEERS = {
    "triton": lambda: _ours("triton"),
    "cutlass": lambda: _ours("cutlass"),
    "flash": lambda: _ours(None),
    "cutlass_sm80": lambda: _ours("cutlass_sm80"),
    "triton_compiled": lambda: _ours_compiled("triton"),
    "cutlass_compiled": lambda: _ours_compiled("cutlass"),
    "flash_compiled": lambda: _ours_compiled(None),
    "sdpa_flash": lambda: _sdpa("flash"),
    "sdpa_cudnn": lambda: _sdpa("cudnn"),
    "sdpa_efficient": lambda: _sdpa("efficient"),
    "flex": _flex,
    "sdpa_math": lambda: _sdpa("math"),
    "eager": _eager,
}
DEFAULT_PEERS = ("triton", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "eager")


def bench_case(fn, n, d, heads, dtype, case, bias_grad, do_bench):
    causal = "causal" in case
    p = 0.1 if "dropout" in case else 0.0
    cap = SOFTCAP if "softcap" in case else 0.0
    q, k, v, bias = _inputs(n, d, heads, dtype, case, bias_grad)
    leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    if cap:
        fn = functools.partial(fn, cap=cap)
    try:
        out = fn(q, k, v, bias, causal, p)
        dout = torch.randn_like(out)
        torch.autograd.grad(out, leaves, dout, retain_graph=True)
    except Exception as e:  # a peer refusing a case is a result, not a failure
        torch.cuda.empty_cache()
        return {"status": "refused", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    fwd_ms = do_bench(lambda: fn(q, k, v, bias, causal, p))
    bwd_ms = do_bench(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))
    # With device timing: which kernels the backward's time went to (an A/B of one kernel).
    bwd_kernels = {name: round(us, 1) for name, us in getattr(do_bench, "by_kernel", {}).items()}
    del out
    both_ms = do_bench(lambda: torch.autograd.grad(fn(q, k, v, bias, causal, p), leaves, dout))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.grad(fn(q, k, v, bias, causal, p), leaves, dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {
        "status": "ok",
        "fwd_us": fwd_ms * 1e3, "bwd_us": bwd_ms * 1e3, "fwd+bwd_us": both_ms * 1e3,
        "fwd_tflops": flops(1, heads, n, n, d, causal, "fwd") / fwd_ms / 1e9,
        "bwd_tflops": flops(1, heads, n, n, d, causal, "bwd") / bwd_ms / 1e9,
        "fwd+bwd_tflops": flops(1, heads, n, n, d, causal, "fwd+bwd") / both_ms / 1e9,
        "peak_extra_mib": peak / 2**20,
        **({"bwd_kernels_us": bwd_kernels} if bwd_kernels else {}),
    }


_TUNED_KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")


def _forget_chosen_configs():
    """Before a case: a kernel the case does not launch (dQ, with dropout's one-kernel backward)
    must not report the config an earlier case picked."""
    from .kernels import triton_attention as ta

    for name in _TUNED_KERNELS:
        getattr(ta, name).best_config = None


def _chosen_configs() -> dict:
    """The config each autotuned kernel last picked (what the timing above ran)."""
    from .kernels import triton_attention as ta

    out = {}
    for name in _TUNED_KERNELS:
        best = getattr(getattr(ta, name), "best_config", None)
        if best is not None:
            out[name] = f"{best.kwargs} warps={best.num_warps} stages={best.num_stages}"
    return out


def device_time(fn, reps: int, by_kernel: dict | None = None) -> tuple[float, float]:
    """(GPU ms, launches) per call of `fn`, from torch.profiler over `reps` calls: the summed
    durations of the kernels (and memsets/copies) it launches. Gaps between kernels, which the
    host's launch time opens at small sizes, are not counted. `by_kernel`, if given, is filled
    with µs per call for each kernel name."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if by_kernel is not None:
        for e in gpu:
            by_kernel[e.name] = by_kernel.get(e.name, 0.0) + e.time_range.elapsed_us() / reps
    return sum(e.time_range.elapsed_us() for e in gpu) / reps / 1e3, len(gpu) / reps


def device_ms(fn, reps: int = 20, warmup: int = 5, by_kernel: dict | None = None) -> float:
    for _ in range(warmup):
        fn()
    return device_time(fn, reps, by_kernel)[0]


def ceilings(do_bench):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = do_bench(lambda: a @ a)
    x = torch.empty(2**30 // 2, device="cuda", dtype=torch.bfloat16).normal_()
    cp = do_bench(lambda: x.clone())
    return {"bf16_matmul_tflops": 2 * 8192**3 / mm / 1e9, "copy_tb_s": 2 * x.numel() * 2 / cp / 1e9}


def markdown(rows, peers) -> str:
    """One table per N: µs fwd / bwd / fwd+bwd per peer, and ours over the best peer."""
    out = []
    for n in sorted({r["n"] for r in rows}):
        out.append(f"\nN={n}, µs fwd / bwd / fwd+bwd (TFLOP/s fwd / bwd); ratio = best peer time / ours\n")
        out.append("| case | " + " | ".join(peers) + " | fwd ratio | bwd ratio |")
        out.append("|" + " --- |" * (len(peers) + 3))
        for case in dict.fromkeys(r["case"] for r in rows if r["n"] == n):
            cells, got = [], {}
            for peer in peers:
                r = next((r for r in rows if r["n"] == n and r["case"] == case and r["peer"] == peer), None)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append("refused")
                else:
                    got[peer] = r
                    cells.append(f"{r['fwd_us']:.0f} / {r['bwd_us']:.0f} / {r['fwd+bwd_us']:.0f} "
                                 f"({r['fwd_tflops']:.0f} / {r['bwd_tflops']:.0f})")
            ratios = ["", ""]
            ours_names = ("triton", "triton_compiled", "cutlass", "cutlass_compiled", "flash", "flash_compiled")
            others = [r for p, r in got.items() if p not in (*ours_names, "eager", "sdpa_math")]
            mine = [r for p, r in got.items() if p in ours_names]
            if mine and others:
                ours = {ph: min(r[f"{ph}_us"] for r in mine) for ph in ("fwd", "bwd")}
                ours = {f"{ph}_us": t for ph, t in ours.items()}
                ratios = [f"{min(o[f'{ph}_us'] for o in others) / ours[f'{ph}_us']:.2f}" for ph in ("fwd", "bwd")]
            out.append(f"| {case} | " + " | ".join(cells) + f" | {ratios[0]} | {ratios[1]} |")
    return "\n".join(out)


def plot(runs, path: str) -> None:
    """Bar charts of forward and backward TFLOP/s per case and kernel, from one or more runs
    (each {"meta", "rows"} as --json writes them); needs matplotlib."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib ({e}); pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for run in runs for r in run["rows"] if r["status"] == "ok"]
    meta = runs[0]["meta"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    width = 0.8 / max(len(peers), 1)
    for ax, phase in zip(axes, ("fwd", "bwd")):
        for i, peer in enumerate(peers):
            vals = [next((r[f"{phase}_tflops"] for r in rows if r["case"] == c and r["peer"] == peer), 0.0)
                    for c in cases]
            ax.bar([x + i * width for x in range(len(cases))], vals, width, label=peer)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, rotation=20)
        ax.set_title(f"{phase}, TFLOP/s (0 = refused or not run)")
    axes[0].legend()
    lengths = ",".join(str(n) for n in sorted({r["n"] for r in rows}))
    fig.suptitle(f"{meta['device']}, {meta.get('dtype', 'bfloat16')}, B=1 H={meta.get('heads', 12)} "
                 f"D={meta.get('head_dim', 128)} N={lengths}, torch {meta['torch']}, triton {meta['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="flash-inductor bench", description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--peers", nargs="+", default=list(DEFAULT_PEERS), choices=list(PEERS))
    ap.add_argument("--bias-grad", action="store_true", help="the bias requires grad (learned bias)")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown at the end")
    ap.add_argument("--plot", default=None, help="write a PNG bar chart here (needs matplotlib)")
    ap.add_argument("--timing", default="wall", choices=("wall", "device"),
                    help="wall: do_bench's per-call time (host launch cost included, L2 flushed); "
                         "device: the GPU time of the call's kernels from torch.profiler (for short "
                         "calls, where the eager op's host time would hide its kernels)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("flash-inductor bench needs a CUDA GPU (it times GPU kernels against each other).")
        return 2
    import triton
    import triton.testing

    def do_bench(fn):
        if args.timing == "device":
            do_bench.by_kernel = {}
            return device_ms(fn, by_kernel=do_bench.by_kernel)
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    dtype = getattr(torch, args.dtype)
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(["flash-inductor", "bench"] + (sys.argv[1:] if argv is None else argv)),
        "dtype": args.dtype, "heads": args.heads, "head_dim": args.head_dim, "bias_grad": args.bias_grad,
        "timing": args.timing,
        "ceilings": ceilings(do_bench),
    }
    print(json.dumps(meta), flush=True)
    rows = []
    for n in args.lengths:
        for case in args.cases:
            for peer in args.peers:
                if peer in ("sdpa_math", "eager") and n > 8192:
                    continue
                if peer == "triton":
                    _forget_chosen_configs()
                res = bench_case(PEERS[peer](), n, args.head_dim, args.heads, dtype, case, args.bias_grad, do_bench)
                row = {"n": n, "d": args.head_dim, "case": case, "peer": peer, **res}
                if peer == "triton" and res["status"] == "ok":
                    row["configs"] = _chosen_configs()
                rows.append(row)
                if res["status"] == "ok":
                    print(f"N={n:5d} D={args.head_dim} {case:20s} {peer:15s} "
                          f"fwd {res['fwd_tflops']:6.1f} bwd {res['bwd_tflops']:6.1f} TFLOP/s "
                          f"({res['fwd_us']:.0f} / {res['bwd_us']:.0f} / {res['fwd+bwd_us']:.0f} µs, "
                          f"peak +{res['peak_extra_mib']:.0f} MiB)", flush=True)
                    if res.get("bwd_kernels_us"):
                        print("    bwd µs: " + ", ".join(f"{k[:40]} {v:.0f}" for k, v in res["bwd_kernels_us"].items()),
                              flush=True)
                else:
                    print(f"N={n:5d} D={args.head_dim} {case:20s} {peer:15s} refused: {res['reason']}", flush=True)
                if args.json:  # written as it goes: a run cut short keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.markdown:
        print(markdown(rows, args.peers))
    if args.plot:
        plot([{"meta": meta, "rows": rows}], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
