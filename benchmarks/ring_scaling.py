"""Issue 7's figure: ring attention throughput on 1 vs W GPUs (NCCL), causal, zigzag sharding.

    python benchmarks/ring_scaling.py --world 2 --lengths 65536 131072 --json ring.json

For each sequence length N: the op on one GPU over the whole sequence (the baseline), then
`ring_attention` over W ranks (one GPU each, zigzag-sharded, each rank holding N/W tokens), forward
and forward+backward, B=1, H=8, D=128, bf16. Reports µs per step (the slowest rank), TFLOP/s
(causal: 2·H·D·N² forward, 2.5× that backward) and the scaling efficiency
t(1 GPU) / (W · t(W GPUs)). Needs W CUDA devices.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import triton
from ranks import run_ranks

os.environ.setdefault("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")

H, D = 8, 128


def _inputs(n, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, H, n, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(4)]


def _time(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3


def _single(n):
    from flash_inductor import attention

    q, k, v, dout = _inputs(n, "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fwd = _time(lambda: attention(q, k, v, causal=True))
    both = _time(lambda: torch.autograd.grad(attention(q, k, v, causal=True), (q, k, v), dout))
    return fwd, both


def _time_collective(fn, iters=10, warmup=3):
    """Median µs of fn() over a fixed number of calls: every rank makes the same calls (do_bench
    picks its repetition count from its own timings, which would leave the ranks' collectives
    unmatched)."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _rank(rank, world, port, n, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    try:
        from flash_inductor.context_parallel import ring_attention, zigzag_shard

        q, k, v, dout = (zigzag_shard(t, rank, world) for t in _inputs(n, f"cuda:{rank}"))
        q, k, v = (t.contiguous().requires_grad_() for t in (q, k, v))

        def step_fwd():
            ring_attention(q, k, v, causal=True)
            torch.cuda.synchronize()
            dist.barrier()

        def step_both():
            torch.autograd.grad(ring_attention(q, k, v, causal=True), (q, k, v), dout)
            torch.cuda.synchronize()
            dist.barrier()

        res = torch.tensor([_time_collective(step_fwd), _time_collective(step_both)], device=f"cuda:{rank}")
        dist.all_reduce(res, op=dist.ReduceOp.MAX)
        if rank == 0:
            out.put(res.tolist())
    except Exception as e:  # reported to the parent, which would otherwise wait for rank 0
        if rank == 0:
            out.put(f"{type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--json")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} CUDA devices, this machine has {torch.cuda.device_count()}")
    rows = []
    for n in args.lengths:
        flop = 2 * H * D * n * n
        f1, b1 = _single(n)
        fw, bw = run_ranks(_rank, (n,), args.world)
        row = dict(n=n, world=args.world, single_fwd_us=f1, single_fwd_bwd_us=b1, ring_fwd_us=fw, ring_fwd_bwd_us=bw,
                   single_fwd_tflops=flop / f1 / 1e6, ring_fwd_tflops=flop / fw / 1e6,
                   efficiency_fwd=f1 / (args.world * fw), efficiency_fwd_bwd=b1 / (args.world * bw))
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
