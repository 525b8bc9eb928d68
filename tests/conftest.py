"""Helpers shared by the test modules: a relative-error measure and random attention inputs."""

from __future__ import annotations

import io
import socket

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dispatch_choices():
    """Tests change what backends declare (monkeypatched limits, UNVALIDATED, the interpreter):
    each starts with no cached dispatch choice (flash_inductor.dispatch._CHOICES)."""
    from flash_inductor import dispatch

    dispatch.clear_choices()
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (the absolute ‖a − b‖ when b is all zeros).

    A NaN or inf in `a` gives NaN or inf, which fails every `err <= bound` check.
    """
    a, b = a.detach().double(), b.detach().double()
    num, den = (a - b).norm(), b.norm()
    return float(num / den) if den > 0 else float(num)


def make_qkv(
    batch: int = 2,
    heads_q: int = 2,
    heads_kv: int | None = None,
    len_q: int = 37,
    len_k: int | None = None,
    head_dim: int = 16,
    head_dim_v: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    requires_grad: bool = False,
):
    """Fresh standard-normal q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (never zeros).

    Defaults: Hkv = Hq, Nk = Nq, Dv = D. Drawn from torch's default generator.
    """
    heads_kv = heads_q if heads_kv is None else heads_kv
    len_k = len_q if len_k is None else len_k
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    shapes = (
        (batch, heads_q, len_q, head_dim),
        (batch, heads_kv, len_k, head_dim),
        (batch, heads_kv, len_k, head_dim_v),
    )
    return tuple(
        torch.randn(s, dtype=dtype, device=device).requires_grad_(requires_grad) for s in shapes
    )


# ---- several processes (tests/test_distributed.py, tests/test_context_parallel.py) ----------------


def spawn_ranks(target, args: tuple, world: int, timeout: float = 600) -> dict:
    """Run target(rank, port, *args, results) in `world` spawned processes; return {rank: payload}.

    Each process puts (rank, payload) on `results` once; a payload that is a str is the error
    the rank raised, and fails the calling test with it.
    """
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, *args, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=timeout) for _ in range(world))
    for p in procs:
        p.join(60)
    for rank, payload in got.items():
        assert not isinstance(payload, str), f"rank {rank}: {payload}"
    return got


def to_bytes(obj) -> bytes:
    """Tensors to send back from a rank: bytes, because a tensor put on the queue lives in the
    sender's shared memory, which is gone by the time the parent reads it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes):
    return torch.load(io.BytesIO(data))


def process_groups(*values):
    """pytest params for the multi-process tests: gloo on CPU always; NCCL on GPUs (one per
    rank, marked `gpu`) where two CUDA devices and NCCL are present. With `values`, each param is
    the tuple (backend, *values), for a parametrize over several names."""
    import pytest
    import torch.distributed as dist

    two_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()
    marks = [pytest.mark.gpu, pytest.mark.skipif(not two_gpus, reason="needs 2 CUDA GPUs and NCCL")]
    if not values:
        return ["gloo", pytest.param("nccl", marks=marks)]
    return [("gloo", *values), pytest.param("nccl", *values, marks=marks)]


def rank_device(backend: str, rank: int) -> torch.device:
    """The device a rank computes on: its own GPU under NCCL, the CPU under gloo."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")
