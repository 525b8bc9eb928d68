"""backend="flash" under DDP and FSDP2: 2 ranks on a gloo process group on CPU (and on NCCL,
one GPU per rank, where two GPUs are present).

Each rank trains one step of a BERT config (random weights) on its half of a padded batch, with
the model compiled by `torch.compile(..., backend="flash")`. Checked against one process running
the whole batch eagerly: the loss, and every parameter gradient (DDP all-reduces the mean of the
ranks' gradients, which is the full batch's gradient since both halves are the same size; FSDP2
reduce-scatters the same mean, gathered here with `full_tensor()`). Also checked: the attention
op ran once per layer per rank, and under DDP the graph really was split at bucket boundaries
(Dynamo's DDPOptimizer compiles each piece with our backend) with every site still rewritten.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from conftest import from_bytes, process_groups, rank_device, rel_err, spawn_ranks, to_bytes

pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
BATCH, SEQ, LAYERS = 4, 16, 2


def _model_and_batch(hidden: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=4,
                     intermediate_size=2 * hidden, vocab_size=99, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[-1, SEQ // 2:] = 0  # a padded sequence: the mask reaches the op as a bias
    return model, ids, mask


def _loss(model, ids, mask, rows=slice(None)):
    """A fixed random projection of the output: every parameter gets a gradient (the square of
    a LayerNorm output would not: its mean is ~1 whatever the input)."""
    out = model(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state
    target = torch.randn((BATCH, *out.shape[1:]), generator=torch.Generator().manual_seed(2))[rows]
    return (out * target.to(out.device)).mean()


def _rank_main(rank: int, port: int, wrapper: str, hidden: int, pg: str, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(pg, rank=rank, world_size=WORLD)
    try:
        import flash_inductor.backend as backend_module
        from flash_inductor import dispatch

        graphs = []
        rewrite = backend_module.rewrite_graph

        def counting_rewrite(gm, *args, **kwargs):
            reports = rewrite(gm, *args, **kwargs)
            graphs.append([r.rewritten for r in reports])
            return reports

        backend_module.rewrite_graph = counting_rewrite
        calls = []
        for b in dispatch.BACKENDS:
            fwd = b.forward
            b.forward = (lambda f: (lambda inp, seed: (calls.append(1), f(inp, seed))[1]))(fwd)

        device = rank_device(pg, rank)
        model, ids, mask = _model_and_batch(hidden)
        model, ids, mask = model.to(device), ids.to(device), mask.to(device)
        if wrapper == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # 1 MiB buckets split this model's graph into several pieces.
            wrapped = DDP(model, bucket_cap_mb=1, device_ids=[rank] if device.type == "cuda" else None)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (WORLD,))
            for layer in model.encoder.layer:
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        compiled = torch.compile(wrapped, backend="flash")
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        loss = _loss(compiled, ids, mask, rows)
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):
                g = g.full_tensor()
            grads[name] = g.detach().cpu().clone()
        losses = [torch.zeros((), device=device) for _ in range(WORLD)]
        dist.all_gather(losses, loss.detach())
        # On a GPU, Inductor launches the Triton kernels itself (kernels_in_graph): the op's
        # backends are never called, so only the CPU run counts calls.
        results.put((rank, to_bytes({"loss": torch.stack(losses).mean().cpu(), "grads": grads, "graphs": graphs,
                                     "op_calls": len(calls) if device.type == "cpu" else None})))
    except Exception as e:  # reported to the parent, which fails the test with it
        results.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def _run(wrapper: str, hidden: int, pg: str):
    return {rank: from_bytes(data) for rank, data in spawn_ranks(_rank_main, (wrapper, hidden, pg), WORLD).items()}


def _reference(hidden: int):
    model, ids, mask = _model_and_batch(hidden)
    loss = _loss(model, ids, mask)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("pg", process_groups())
@pytest.mark.parametrize("wrapper,hidden", [("ddp", 256), ("fsdp2", 64)])
def test_flash_backend_under_data_parallel(wrapper, hidden, pg):
    out = _run(wrapper, hidden, pg)
    ref_loss, ref_grads = _reference(hidden)
    for rank, res in out.items():
        assert rel_err(res["loss"], ref_loss) < 1e-5, rank
        flat_ref = torch.cat([g.flatten() for g in ref_grads.values()])
        flat = torch.cat([res["grads"][n].flatten() for n in ref_grads])
        assert rel_err(flat, flat_ref) < 1e-5, f"rank {rank}: all gradients {rel_err(flat, flat_ref):.2e}"
        # Per parameter, against the gradients' overall scale: some are exactly zero in exact
        # arithmetic (a key bias shifts every score of a row alike) and hold only rounding noise.
        scale = flat_ref.abs().max()
        for name, g in ref_grads.items():
            err = (res["grads"][name] - g).abs().max() / scale
            assert err < 1e-5, f"rank {rank}: {name}: {err:.2e}"
        # Every site seen by the backend was rewritten, and the op ran once per layer.
        sites = [s for graph in res["graphs"] for s in graph]
        assert sites and all(sites), res["graphs"]
        assert res["op_calls"] in (LAYERS, None), res["op_calls"]
        if wrapper == "ddp":
            assert len(res["graphs"]) > 1, "DDP's bucket boundaries did not split the graph"
