"""`flash_inductor.explain(model, *args, **kwargs)`: what the rewrite does to a model, site by site."""

from __future__ import annotations

import torch

from .rewrite.report import Report, recording


def explain(model, *args, **kwargs) -> Report:
    """Trace `model(*args, **kwargs)` with the rewrite and return its report (nothing is compiled).

    The model runs once, in its current train/eval mode, with the rewritten graphs executed
    eagerly, so the report shows each attention site as `backend="flash"` would see it: rewritten
    (with the spelling matched and the kernel dispatch picks for these inputs) or skipped (with
    the guard that refused it).
    """
    from .backend import rewrite_only

    torch._dynamo.reset()
    try:
        with recording() as report, torch.no_grad():
            torch.compile(model, backend=rewrite_only)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return report
