"""`flash-inductor coverage`: every attention layer of common HuggingFace architectures, rewritten?

For each architecture (2 small layers, random weights) × attn_implementation × mode, the model
runs once eagerly and once with the rewrite (graphs run eagerly after rewriting, so no Inductor
compile time is spent), and the row reports: attention sites found (softmax or SDPA anchors),
sites rewritten, and the largest relative difference from eager over the output and, in
training without dropout, every parameter gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .models import COVERAGE, build_any, main_output
from .rewrite.report import recording

MODES = ("inference", "train", "train+dropout")


@dataclass
class Row:
    model: str
    impl: str
    mode: str
    sites: int = 0
    rewritten: int = 0
    max_rel_err: float | None = None  # None: not comparable (dropout) or not run
    seconds: float = 0.0
    compile_s: float | None = None  # first call through backend="flash" (Inductor), when asked for
    error: str = ""
    skipped_reasons: tuple = ()

    @property
    def ok(self) -> bool:
        parity = self.max_rel_err is None or self.max_rel_err < 1e-4
        return not self.error and self.sites > 0 and self.rewritten == self.sites and parity


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _run(model, fn, inputs, train: bool, seed: int = 0):
    """Run `fn` (the model or its compiled wrapper); gradients are read off `model` itself."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    if not train:
        with torch.no_grad():
            return main_output(fn(**inputs)), {}
    y = main_output(fn(**inputs))
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * proj).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


def check(model_type: str, impl: str, mode: str, compile: bool = False) -> Row:
    from .backend import rewrite_only

    row = Row(model_type, impl, mode)
    t0 = time.perf_counter()
    try:
        built = build_any(model_type, attn_implementation=impl, dropout=0.1 if mode == "train+dropout" else 0.0)
    except Exception as e:
        # transformers refuses an attn_implementation the architecture lacks (BLOOM has no SDPA
        # path): a row that cannot exist. Anything else is this builder failing the model, a
        # failure of the row, not a skip.
        what = "build" if "attention implementation" in str(e) else "build failed"
        row.error = f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return row
    model, train = built.model.train(mode != "inference"), mode != "inference"
    try:
        ref, ref_grads = _run(model, model, built.inputs, train)
        torch._dynamo.reset()
        with recording() as report:
            out, grads = _run(model, torch.compile(model, backend=rewrite_only), built.inputs, train)
        torch._dynamo.reset()
    except Exception as e:
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    row.sites, row.rewritten = len(report.sites), report.rewritten
    row.skipped_reasons = tuple(s.line() for s in report.sites if not s.rewritten)
    if mode != "train+dropout":
        errs = [_rel(out, ref)]
        if set(grads) != set(ref_grads):
            row.error = "a different set of parameters got gradients"
        # A gradient that is zero in exact arithmetic (the key projection's bias: softmax cancels
        # a per-row constant) is rounding noise in both runs (OPT: 8e-8 against a largest
        # gradient of 846; SigLIP: 5e-9, its two runs 1.7e-8 apart, against 1.6), so errors are
        # relative to at least 1e-3 of the largest gradient: an error on a gradient that small
        # is still caught once it exceeds 1e-7 of the largest.
        scale = max((g.norm() for g in ref_grads.values()), default=torch.tensor(1.0))
        errs += [float((grads[n].double() - ref_grads[n].double()).norm() / max(ref_grads[n].norm(), 1e-3 * scale))
                 for n in ref_grads if n in grads]
        row.max_rel_err = max(errs)
    elif not torch.isfinite(out).all() or not all(torch.isfinite(g).all() for g in grads.values()):
        row.error = "non-finite output or gradient with dropout"
    row.seconds = time.perf_counter() - t0  # eager + rewritten runs, without the Inductor compile
    if compile and not row.error:
        try:
            with torch._inductor.config.patch(force_disable_caches=True):
                t1 = time.perf_counter()
                _run(model, torch.compile(model, backend="flash"), built.inputs, train)
                row.compile_s = time.perf_counter() - t1
        except Exception as e:
            row.error = f"backend='flash' compile: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        finally:
            torch._dynamo.reset()
    return row


def run(models=COVERAGE, impls=("eager", "sdpa"), modes=MODES, compile=False, out=print) -> list[Row]:
    rows = []
    out(f"{'model':<11} {'attn':<6} {'mode':<14} {'rewritten':>10}  {'max rel err':>11}  {'s':>5}  {'compile':>7}  note")
    for m in models:
        for impl in impls:
            for mode in modes:
                r = check(m, impl, mode, compile)
                rows.append(r)
                err = "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"
                comp = "-" if r.compile_s is None else f"{r.compile_s:.1f}"
                note = r.error or ("; ".join(r.skipped_reasons)[:100] if r.skipped_reasons else "")
                out(f"{m:<11} {impl:<6} {mode:<14} {r.rewritten:>4}/{r.sites:<5}  {err:>11}  {r.seconds:5.1f}  {comp:>7}  {note}")
    return rows


def markdown(rows: list[Row]) -> str:
    """One line per architecture × attn_implementation, the three modes side by side."""
    lines = ["| model | attn | inference | train | train + dropout |", "| --- | --- | --- | --- | --- |"]
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r.model, r.impl), {})[r.mode] = r

    def cell(r: Row | None) -> str:
        if r is None:
            return "—"
        if r.error.startswith("build:"):
            return "no such implementation"
        err = "" if r.max_rel_err is None else f", err {r.max_rel_err:.0e}"
        comp = "" if r.compile_s is None else f", compile {r.compile_s:.0f} s"
        return f"{r.rewritten}/{r.sites}{err}{comp}" + ("" if r.ok else " FAIL")

    for (model, impl), modes in by_key.items():
        lines.append(f"| {model} | {impl} | " + " | ".join(cell(modes.get(m)) for m in MODES) + " |")
    return "\n".join(lines)
