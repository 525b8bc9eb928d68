"""Every autotune candidate of the three Triton kernels, timed one at a time, on the attention
shapes the e2e models run (head dim 64, N = 512..4096) and on issue 3's N = 8192 rows.

Why: with autotuning off (the e2e runs, the GPU tests, users who want quick compiles) each
kernel runs one default config; the first of each list was picked at D = 128, N >= 4096, and
every e2e model has head dim 64. This measures, per shape, what each candidate costs, so the
default can follow the head dim and length (triton_attention.py `_head_dim_default`).

Each kernel is timed in a CUDA graph (triton.testing.do_bench_cudagraph), so host time does not
hide the kernel at small N. A backward config is timed as the whole backward (preprocess + dK/dV
+ dQ) with the other kernel at its autotune-off default for the shape (so a head dim of 256, which
the D = 128 default does not fit, can be swept), so dK/dV and dQ choices can be read separately.

    python benchmarks/config_sweep.py --cases bert t5 --json sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

from flash_inductor.inputs import AttentionInputs, Causal
from flash_inductor.kernels import triton_attention as ta

# The kernels not being varied run their autotune-off default (`_prune` keeps only that one).
os.environ[ta.AUTOTUNE_ENV] = "0"

# name: (batch, heads, N, D, causal, bias kind, dropout p); shapes as the e2e models run them
CASES = {
    "bert": (8, 12, 512, 64, False, "padding", 0.0),
    "bert_train": (8, 12, 512, 64, False, "padding", 0.1),
    "t5": (8, 12, 512, 64, False, "per_head", 0.0),
    "gpt2_train": (4, 16, 1024, 64, True, None, 0.1),
    "gpt2": (4, 16, 1024, 64, True, None, 0.0),
    "bloom": (2, 16, 2048, 64, True, "alibi", 0.0),
    "llama": (1, 32, 4096, 64, True, None, 0.0),
    "d64_8k": (1, 12, 8192, 64, False, None, 0.0),
    "d64_8k_causal": (1, 12, 8192, 64, True, None, 0.0),
    "d128_8k_causal": (1, 12, 8192, 128, True, None, 0.0),
    # issue 3's N <= 4096 rows, where the backward trails FlexAttention
    "d128_2k": (1, 12, 2048, 128, False, None, 0.0),
    "d128_2k_bias_causal": (1, 12, 2048, 128, True, "per_head", 0.0),
    "d128_4k_causal": (1, 12, 4096, 128, True, None, 0.0),
    "d128_4k_bias_causal": (1, 12, 4096, 128, True, "per_head", 0.0),
    # issue 3's N = 8192 bias rows (the bench's per-head bias), and dropout's one-kernel backward
    "d128_8k_bias": (1, 12, 8192, 128, False, "per_head", 0.0),
    "d128_8k_bias_causal": (1, 12, 8192, 128, True, "per_head", 0.0),
    "d128_8k_dropout": (1, 12, 8192, 128, False, None, 0.1),
    # Gemma 2 2B's attention in e2e_models.py (its 4 KV heads repeated here), and the bench row
    "gemma2": (2, 8, 2048, 256, True, "padding", 0.0),
    "d256_8k": (1, 12, 8192, 256, False, None, 0.0),
}
KERNELS = {"fwd": ta._attn_fwd, "dkdv": ta._attn_bwd_dkdv, "dq": ta._attn_bwd_dq}


def make_inputs(b, h, n, d, causal, bias_kind, p):
    g = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    bias = None
    if bias_kind == "padding":  # the last sequence has 2/3 real tokens, as in e2e_models.py
        bias = torch.zeros(b, 1, 1, n, device="cuda", dtype=torch.bfloat16)
        bias[-1, ..., 2 * n // 3:] = torch.finfo(torch.bfloat16).min
    elif bias_kind == "per_head":
        bias = torch.randn(1, h, n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    elif bias_kind == "alibi":
        bias = torch.randn(b, h, 1, n, device="cuda", dtype=torch.bfloat16, generator=g)
    return AttentionInputs(q, k, v, bias, Causal.TOP_LEFT if causal else Causal.NONE, d ** -0.5, p)


def _label(cfg) -> str:
    return f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def sweep(name: str) -> dict:
    inp = make_inputs(*CASES[name])
    seed = torch.tensor([1234, 5678], dtype=torch.int64, device="cuda") if inp.dropout_p > 0 else None
    out, lse = ta.forward(inp, seed)
    dout = torch.randn_like(out)
    originals = {k: list(kern.configs) for k, kern in KERNELS.items()}
    def backward():
        return ta.backward(inp, seed, out, lse, dout, None, False)

    run = {"fwd": lambda: ta.forward(inp, seed), "dkdv": backward, "dq": backward}
    # With dropout the backward is one kernel (`ta.fused_dq`): no dQ kernel to sweep.
    swept = {k: kern for k, kern in KERNELS.items() if not (k == "dq" and ta.fused_dq(inp, False))}
    for kern in swept.values():
        kern.cache = {}
    run["fwd"](), backward()  # full lists, autotuning off: each kernel's default for this shape
    defaults = {k: _label(kern.best_config) for k, kern in swept.items()}
    result = {}
    large = max(inp.head_dim, inp.head_dim_v) > 128
    for kname, kern in swept.items():
        times = {}
        for cfg in (c for c in originals[kname] if large or id(c) not in ta._LARGE_HEAD_ONLY):
            for other, okern in KERNELS.items():  # the others at their autotune-off default
                okern.configs = originals[other]
                okern.cache = {}
            kern.configs = [cfg]
            kern.cache = {}
            try:
                run[kname]()
                torch.cuda.synchronize()
                times[_label(cfg)] = triton.testing.do_bench_cudagraph(run[kname], rep=60) * 1e3
            except Exception as e:  # out of shared memory / registers: not a candidate here
                times[_label(cfg)] = f"failed: {type(e).__name__}"
        for k, kern2 in KERNELS.items():
            kern2.configs = originals[k]
            kern2.cache = {}
        ok = {c: t for c, t in times.items() if isinstance(t, float)}
        best = min(ok, key=ok.get) if ok else None
        first = defaults[kname]
        result[kname] = {"us": times, "best": best, "first": first}
        if best:
            print(f"{name:16s} {kname:5s} first {first:16s} {times.get(first, float('nan')):9.1f} us   "
                  f"best {best:16s} {ok[best]:9.1f} us", flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": " ".join(["python", "benchmarks/config_sweep.py"] + (sys.argv[1:] if argv is None else argv))}
    print(json.dumps(meta), flush=True)
    results = {}
    for name in args.cases:
        results[name] = {"shape": CASES[name], **sweep(name)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "cases": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
