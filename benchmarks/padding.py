"""Issue 6's benchmark: padded batches, three ways, and a HuggingFace causal mask.

    python benchmarks/padding.py --json out.json

Part 1 (the issue's table). A batch of 16 sequences, lengths uniform in 128..8192 (seeded),
H=12, D=128, bf16, bidirectional (BERT-style key padding):
  (a) packed through the varlen op (`attention_varlen`, what a nested tensor calls);
  (b) padded to the longest, with an additive padding mask [B, 1, 1, N], through SDPA's best
      backend that takes a mask (efficient, cuDNN);
  (c) the same padded attention written as eager PyTorch (softmax(q·kᵀ·s + mask)·v, the mask
      built as HF does: where(keep, 0, finfo.min)) compiled with backend="flash", the mask a
      graph input; and (c') with the mask built inside the compiled graph from a [B, N]
      attention_mask, as a HF model does;
  dense: our kernel on a dense batch of about the same real tokens (B=16, N=mean length), the
      TFLOP/s that (a) and (c) are compared with.
TFLOP/s count real tokens only: 4·H·D·Σ Lq·Lk forward (2.5× that backward). Padded query rows
of (b) and (c) still attend to their sequence's real keys (HF semantics), so (c) does
Σ N·L of work against the real Σ L²: its TFLOP/s-on-real-tokens is capped by that ratio.

Part 2. A LLaMA-style mask: causal and right padding in one [B, 1, N, N] float mask (what HF
hands eager attention), N=4096, B=2, H=32, D=128: our op with the mask and mask tiles on, with
them off (FLASH_INDUCTOR_MASK_TILES=0: every tile read), and with the causal flag and no mask
(the floor), beside SDPA's efficient and cuDNN backends with the mask.

Times are medians of triton.testing.do_bench in µs; Triton autotuning is off
(FLASH_INDUCTOR_TRITON_AUTOTUNE=0: every variant runs its default config, so the rows compare
the same tile shapes).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton

os.environ.setdefault("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")

import flash_inductor  # noqa: E402
from flash_inductor import attention, attention_varlen  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def fwd_bwd(fn, leaves):
    """(fwd µs, fwd+bwd µs) of fn(), gradients taken w.r.t. leaves."""
    out = fn()
    dout = torch.randn_like(out)
    f = bench(fn)
    fb = bench(lambda: torch.autograd.grad(fn(), leaves, dout))
    return f, fb


def tflops(flop, us):
    return flop / (us * 1e-6) / 1e12


def part1(h=12, d=128, batch=16, lo=128, hi=8192, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()
    n = -(-max(lengths) // 64) * 64  # padded to a multiple of 64, as tokenizers pad (and SDPA's kernels want)
    dt, dev = torch.bfloat16, "cuda"
    real_pairs = sum(L * L for L in lengths)
    fwd_flop = 4 * h * d * real_pairs
    both_flop = 3.5 * fwd_flop
    rows = {"lengths": lengths, "real_tokens": sum(lengths), "padded_tokens": batch * n}

    # (a) packed
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    f, fb = fwd_bwd(lambda: attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths)), [q, k, v])
    rows["a_varlen"] = dict(fwd_us=f, fwd_bwd_us=fb, fwd_tflops=tflops(fwd_flop, f), fwd_bwd_tflops=tflops(both_flop, fb))

    # padded tensors and the HF-style mask
    qp, kp, vp = (torch.randn(batch, h, n, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    keep = torch.arange(n, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]
    mask = torch.where(keep, 0.0, torch.finfo(dt).min).to(dt)[:, None, None, :]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("b_sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION), ("b_sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                f, fb = fwd_bwd(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask), [qp, kp, vp])
            rows[name] = dict(fwd_us=f, fwd_bwd_us=fb, fwd_tflops=tflops(fwd_flop, f), fwd_bwd_tflops=tflops(both_flop, fb))
        except RuntimeError as e:
            rows[name] = dict(error=str(e).splitlines()[0][:200])

    # (c) eager-written attention compiled with backend="flash"
    def eager_attention(q, k, v, mask):
        w = torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5 + mask
        return torch.matmul(torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

    torch._dynamo.reset()
    compiled = torch.compile(eager_attention, backend="flash")
    f, fb = fwd_bwd(lambda: compiled(qp, kp, vp, mask), [qp, kp, vp])
    rows["c_flash_compiled"] = dict(fwd_us=f, fwd_bwd_us=fb, fwd_tflops=tflops(fwd_flop, f), fwd_bwd_tflops=tflops(both_flop, fb))

    # (c') as a HF model runs it: the mask built inside the compiled graph from attention_mask,
    # so the rewrite sees its constants (a fully masked row is eager's uniform average of V, not
    # the general bias patch, docs/design.md §3)
    def hf_attention(q, k, v, attention_mask):
        mask = torch.where(attention_mask[:, None, None, :].bool(), 0.0, torch.finfo(dt).min).to(dt)
        return eager_attention(q, k, v, mask)

    compiled_hf = torch.compile(hf_attention, backend="flash")
    f, fb = fwd_bwd(lambda: compiled_hf(qp, kp, vp, keep.long()), [qp, kp, vp])
    rows["c_flash_compiled_mask_in_graph"] = dict(fwd_us=f, fwd_bwd_us=fb, fwd_tflops=tflops(fwd_flop, f),
                                                  fwd_bwd_tflops=tflops(both_flop, fb))

    # dense batch of (about) the same real tokens
    nd = round(total / batch)
    qd, kd, vd = (torch.randn(batch, h, nd, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    f, fb = fwd_bwd(lambda: attention(qd, kd, vd), [qd, kd, vd])
    dense_flop = 4 * h * d * batch * nd * nd
    rows["dense_same_tokens"] = dict(n=nd, fwd_us=f, fwd_bwd_us=fb, fwd_tflops=tflops(dense_flop, f),
                                     fwd_bwd_tflops=tflops(3.5 * dense_flop, fb))
    return rows


def part2(b=2, h=32, n=4096, d=128, lengths=(4096, 2500)):
    dt, dev = torch.bfloat16, "cuda"
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    idx = torch.arange(n, device=dev)
    real = idx[None, :] < torch.tensor(lengths, device=dev)[:, None]
    keep = (idx[None, :] <= idx[:, None])[None, None] & real[:, None, None, :]
    mask = torch.where(keep, 0.0, torch.finfo(dt).min).to(dt)  # [B, 1, N, N]
    causal_flop = 2 * h * d * n * n * b  # half of dense: what causal attention costs
    rows = {}

    def add(name, fn, leaves):
        f, fb = fwd_bwd(fn, leaves)
        rows[name] = dict(fwd_us=f, fwd_bwd_us=fb, fwd_tflops_causal=tflops(causal_flop, f),
                          fwd_bwd_tflops_causal=tflops(3.5 * causal_flop, fb))

    add("flash_mask_tiles_on", lambda: attention(q, k, v, mask), [q, k, v])
    os.environ["FLASH_INDUCTOR_MASK_TILES"] = "0"
    try:
        add("flash_mask_tiles_off", lambda: attention(q, k, v, mask), [q, k, v])
    finally:
        del os.environ["FLASH_INDUCTOR_MASK_TILES"]
    add("flash_causal_flag_no_mask", lambda: attention(q, k, v, causal=True), [q, k, v])
    # What reading the mask costs: the tile map and lists, once per forward and once per backward.
    from flash_inductor.inputs import validate
    from flash_inductor.kernels import mask_tiles, triton_attention

    inp = validate(q, k, v, mask)
    b4, strides = triton_attention._bias_args(inp, q)
    rows["mask_tiles_classify"] = dict(us=bench(lambda: mask_tiles.classify(inp, b4, strides, triton_attention._direct)))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa_efficient_mask", SDPBackend.EFFICIENT_ATTENTION), ("sdpa_cudnn_mask", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                add(name, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), [q, k, v])
        except RuntimeError as e:
            rows[name] = dict(error=str(e).splitlines()[0][:200])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--parts", nargs="+", default=["1", "2"])
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "flash_inductor": getattr(flash_inductor, "__version__", "?")}
    if "1" in args.parts:
        res["part1"] = part1()
        print(json.dumps(res["part1"], indent=1))
    if "2" in args.parts:
        res["part2"] = part2()
        print(json.dumps(res["part2"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
