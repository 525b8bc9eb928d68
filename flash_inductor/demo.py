"""`flash-inductor demo`: a real HuggingFace architecture compiled with backend="flash".

Builds the model from its published config with random weights (nothing is downloaded), prints
the rewrite report, the largest difference from eager, and eager/compiled timings. Runs on the
GPU in bf16 when there is one, else on the CPU in float32.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from .explain import explain
from .models import build, main_output


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_demo(model: str = "bert", size: str = "base", batch: int = 2, seq_len: int = 128,
             attn_implementation: str = "eager", train: bool = False, repeats: int = 10,
             device: str | None = None, compare_inductor: bool = False, out=print) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    built = build(model, size=size, attn_implementation=attn_implementation, batch=batch,
                  seq_len=seq_len, device=dev, dtype=dtype, dropout=0.0)
    m = built.model.train(train)
    mode = "training step (forward + backward)" if train else "inference"
    out(f"flash-inductor demo: {model} ({size} config, random weights), batch {batch} x seq {seq_len}, "
        f"{str(dtype).replace('torch.', '')} on {dev.type}, attn_implementation={attn_implementation}, {mode}")
    out("(the last sequence of the batch is padded: its attention_mask is 0 for the final third)")

    report = explain(m, **built.inputs)
    out(str(report))

    def step(fn):
        if train:
            m.zero_grad(set_to_none=True)
            y = main_output(fn(**built.inputs))
            y.float().pow(2).mean().backward()
            return y.detach()
        with torch.no_grad():
            return main_output(fn(**built.inputs))

    torch._dynamo.reset()
    compiled = torch.compile(m, backend="flash")
    t0 = time.perf_counter()
    y_flash = step(compiled)
    compile_s = time.perf_counter() - t0
    y_eager = step(m)
    err = (y_flash.float() - y_eager.float()).abs().max().item()
    rel = ((y_flash.float() - y_eager.float()).norm() / y_eager.float().norm()).item()
    out(f"parity: max |flash - eager| = {err:.3g}, relative {rel:.3g} "
        f"({'bf16' if dtype == torch.bfloat16 else 'fp32'} arithmetic)")
    if dtype != torch.float32:
        # Two bf16 runs differ by bf16 rounding; against an fp32 copy, flash's error should be
        # no larger than eager bf16's own.
        y_ref = step(copy.deepcopy(m).float()).float()

        def rel_to_fp32(y):
            return ((y.float() - y_ref).norm() / y_ref.norm()).item()

        out(f"against the same model in fp32: flash relative error {rel_to_fp32(y_flash):.3g}, "
            f"eager bf16 {rel_to_fp32(y_eager):.3g}")
    out(f"compile (first call) took {compile_s:.1f} s")

    results = {"max_abs_err": err, "rel_err": rel, "sites": report.rewritten,
               "attention_layers": built.num_attention_layers, "compile_s": compile_s}
    timed = [("eager", m), ("flash", compiled)]
    if compare_inductor:
        timed.append(("inductor", torch.compile(m, backend="inductor")))
    for name, fn in timed:
        step(fn)  # warm (compiles the inductor variant)
        results[f"{name}_ms"] = _median_ms(lambda: step(fn), repeats, dev)
    line = ", ".join(f"{name} {results[name + '_ms']:.2f} ms" for name, _ in timed)
    speedup = results["eager_ms"] / results["flash_ms"]
    out(f"timing (median of {repeats}): {line}; eager/flash = {speedup:.2f}x")
    return results
