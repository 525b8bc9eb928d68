"""The `flash` torch.compile backend: our rewrite on the Dynamo graph, then Inductor.

Why the rewrite runs on the Dynamo graph, before AOTAutograd (docs/design.md has the long form):
the graph there holds the model's own torch-level calls, so one composable matcher covers
every spelling in training and inference alike; autograd then traces the op's registered
backward. Inductor's joint-graph alternative needs a forward *and* a backward traced pattern per
spelling and per dtype/dropout variant, and sees softmax already decomposed.
"""

from __future__ import annotations

import torch

from .rewrite.matcher import rewrite_graph

_graph_counter = 0


def rewrite_only(gm: torch.fx.GraphModule, example_inputs):
    """Rewrite attention and run the graph eagerly (what `explain` uses: no Inductor compile)."""
    global _graph_counter
    _graph_counter += 1
    rewrite_graph(gm, f"graph{_graph_counter}")
    return gm.forward


def flash_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """torch.compile(model, backend="flash"): attention rewritten into flash::fwd, then Inductor."""
    from torch._inductor.compile_fx import compile_fx

    global _graph_counter
    _graph_counter += 1
    rewrite_graph(gm, f"graph{_graph_counter}")
    return compile_fx(gm, example_inputs, **kwargs)
