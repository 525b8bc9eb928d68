"""One process a rank for the multi-GPU benchmarks (ring_scaling.py, ddp_step.py)."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp


def run_ranks(target, args: tuple, world: int, timeout: float = 900):
    """Run target(rank, world, port, *args, out) in `world` spawned processes and return what
    rank 0 puts on `out`; a str is the error rank 0 raised, and ends the benchmark with it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    res = out.get(timeout=timeout)
    for p in procs:
        p.join(60)
    if isinstance(res, str):
        raise SystemExit(f"world {world}: {res}")
    return res
