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


def inductor_config(mode: str | None = None, options: dict | None = None) -> dict:
    """Inductor config patches for torch.compile's `mode=` and `options=`, as backend="inductor"
    reads them, plus one of ours (a user's `options=` still wins):

    `static_launch_user_defined_triton_kernels`: our kernels are user-defined Triton kernels in
    Inductor's code (kernels_in_graph.py), which Inductor otherwise launches through Triton's own
    Python launcher instead of its static one; host time decides the small shapes on the lent
    GPU hosts (benchmarks/NOTES.md, session 7). A kernel the static launcher cannot take falls
    back to Triton's launcher by itself.

    `post_grad_custom_post_pass`: a pass that changes nothing and keys Inductor's caches on our
    sources (compile_cache.py), after the user's own post-grad pass if they set one."""
    from torch._inductor import config as inductor_cfg
    from torch._inductor import list_mode_options

    from .compile_cache import fingerprinted_post_grad_pass

    patches = {}
    if hasattr(inductor_cfg, "static_launch_user_defined_triton_kernels") and inductor_cfg.use_static_cuda_launcher:
        patches["static_launch_user_defined_triton_kernels"] = True
    patches.update(list_mode_options(mode) if mode and mode != "default" else {})
    patches.update(options or {})
    patches["post_grad_custom_post_pass"] = fingerprinted_post_grad_pass(
        patches.get("post_grad_custom_post_pass", inductor_cfg.post_grad_custom_post_pass))
    return patches


def flash_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """torch.compile(model, backend="flash"[, mode=..., options=...]): attention rewritten into
    flash::fwd, then Inductor with the same mode and options backend="inductor" would take."""
    from torch._inductor.compile_fx import compile_fx

    global _graph_counter
    _graph_counter += 1
    patches = inductor_config(mode, options)  # before rewriting: a bad mode fails fast
    rewrite_graph(gm, f"graph{_graph_counter}")
    return compile_fx(gm, example_inputs, config_patches=patches)
