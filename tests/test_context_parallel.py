"""Ring attention over 2 ranks (gloo on CPU; NCCL on 2 GPUs where present) and 3 (gloo), against one process attending the whole sequence.

Fresh random inputs, a float64 ground truth (`attention_ref` on the full sequence), forward and
the gradients of q, k and v gathered from the ranks' shards; with and without causal (zigzag
load balancing), with GQA.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from conftest import from_bytes, process_groups, rank_device, rel_err, spawn_ranks, to_bytes

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

def _full_inputs(dtype):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 24, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, 24, 16, generator=g).to(dtype)
    v = torch.randn(2, 2, 24, 16, generator=g).to(dtype)
    dout = torch.randn(2, 4, 24, 16, generator=g).to(dtype)
    return q, k, v, dout


def _rank_main(rank, port, causal, dtype, pg, world, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(pg, rank=rank, world_size=world)
    try:
        from flash_inductor.context_parallel import ring_attention, zigzag_shard

        device = rank_device(pg, rank)
        q, k, v, dout = (t.to(device) for t in _full_inputs(dtype))
        if causal:
            q, k, v, dout = (zigzag_shard(t, rank, world) for t in (q, k, v, dout))
        else:
            q, k, v, dout = (t.chunk(world, dim=2)[rank] for t in (q, k, v, dout))
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = ring_attention(q, k, v, causal=causal)
        out.backward(dout)
        got = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        results.put((rank, to_bytes({n: t.cpu() for n, t in got.items()})))
    except Exception as e:
        results.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pg,world", process_groups(2) + [("gloo", 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal_zigzag"])
def test_ring_attention_matches_one_process(causal, dtype, pg, world):
    """Under NCCL each rank runs the op on its own GPU (Triton for float32, the reference for
    float64) and the K/V blocks travel GPU to GPU. Three ranks reach every zigzag case: blocks
    from ranks before and after this one, and more than one hop."""
    from flash_inductor import attention_ref
    from flash_inductor.context_parallel import zigzag_unshard

    got = spawn_ranks(_rank_main, (causal, dtype, pg, world), world, timeout=300)
    shards = [from_bytes(got[r]) for r in range(world)]
    join = (lambda xs: zigzag_unshard(xs)) if causal else (lambda xs: torch.cat(xs, dim=2))
    full = {name: join([s[name] for s in shards]) for name in ("out", "dq", "dk", "dv")}

    q, k, v, dout = _full_inputs(dtype)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*leaves, causal=causal)
    ref.backward(dout.double())
    bound = 1e-12 if dtype == torch.float64 else 1e-5
    for name, want in zip(("out", "dq", "dk", "dv"), (ref, *(t.grad for t in leaves))):
        assert full[name].dtype == dtype, name
        assert rel_err(full[name], want) < bound, f"{name}: {rel_err(full[name], want):.2e}"


def test_ring_attention_refuses_what_it_cannot_shard():
    from flash_inductor.context_parallel import ring_attention

    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="bias or dropout"):
        ring_attention(q, q, q, bias=torch.zeros(8, 8))
    with pytest.raises(ValueError, match="initialised torch.distributed"):
        ring_attention(q, q, q)
