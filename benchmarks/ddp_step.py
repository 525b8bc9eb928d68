"""Issue 7's second figure: a DDP training step of a HuggingFace model compiled with backend="flash",
on 1 GPU vs W GPUs (NCCL, one process a GPU), the same batch per GPU (weak scaling).

    python benchmarks/ddp_step.py --world 2 --json ddp.json                  # GPUs
    python benchmarks/ddp_step.py --world 2 --device cpu --size tiny         # gloo smoke run

The model is the LLaMA-style config of flash_inductor.models ("llama", base size) cut to
--layers layers, fp32 weights under bf16 autocast, fused AdamW, a padded batch per rank. One step
is forward, backward of a scalar loss, and the optimizer step; under DDP the gradient all-reduce
overlaps the backward (Dynamo's DDPOptimizer splits the graph at bucket boundaries, and every
piece is compiled with our backend). Reports the median step time over --steps steps (the slowest
rank), tokens/s, and the scaling efficiency t(1 GPU) / t(W GPUs): 1.0 means the all-reduce is
hidden completely.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from ranks import run_ranks

os.environ.setdefault("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")


def _build(size: str, layers: int, batch: int, seq: int, device: torch.device, rank: int):
    from transformers import AutoConfig, AutoModel

    from flash_inductor.models import BASE, TINY, _padded_text_inputs

    kw = dict((TINY if size == "tiny" else BASE)["llama"])
    kw.pop("model_type")
    kw["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model("llama", **kw)
    torch.manual_seed(0)  # the same weights on every rank, as DDP requires
    model = AutoModel.from_config(cfg, attn_implementation="sdpa").to(device)
    inputs = _padded_text_inputs(cfg, batch, seq, torch.Generator().manual_seed(1 + rank))
    return model, {k: v.to(device) for k, v in inputs.items()}


def _rank(rank: int, world: int, port: int, args, out):
    device = torch.device("cpu")
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        if args.device == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        model, inputs = _build(args.size, args.layers, args.batch, args.seq, device, rank)
        params = sum(p.numel() for p in model.parameters())
        wrapped = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[rank] if device.type == "cuda" else None)
        compiled = torch.compile(wrapped, backend="flash")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)

        def step():
            with autocast:
                loss = compiled(**inputs).last_hidden_state.float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        step()  # compiles
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            step()
        times = []
        for _ in range(args.steps):  # a fixed count: every rank makes the same collectives
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        res = torch.tensor([statistics.median(times)], device=device)
        if world > 1:
            dist.all_reduce(res, op=dist.ReduceOp.MAX)
        if rank == 0:
            out.put(dict(step_ms=res.item(), compile_s=compile_s, params=params))
    except Exception as e:  # reported to the parent
        if rank == 0:
            out.put(f"{type(e).__name__}: {e}")
        raise
    finally:
        if world > 1:
            dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--size", choices=["base", "tiny"], default="base")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2, help="sequences per GPU")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} CUDA devices, this machine has {torch.cuda.device_count()}")
    single = run_ranks(_rank, (args,), 1)
    ddp = run_ranks(_rank, (args,), args.world)
    tokens = args.batch * args.seq
    row = dict(model=f"llama-{args.size} {args.layers} layers", params=single["params"], batch_per_gpu=args.batch,
               seq=args.seq, world=args.world, single_step_ms=single["step_ms"], ddp_step_ms=ddp["step_ms"],
               single_tokens_per_s=tokens / single["step_ms"] * 1e3,
               ddp_tokens_per_s=args.world * tokens / ddp["step_ms"] * 1e3,
               efficiency=single["step_ms"] / ddp["step_ms"],
               compile_s_single=single["compile_s"], compile_s_ddp=ddp["compile_s"])
    print(json.dumps(row))
    if args.json:
        dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "rows": [row]}, f, indent=1)


if __name__ == "__main__":
    main()
