"""Inductor's caches key compiled graphs on our code too.

AOTAutograd's cache and Inductor's FX graph cache key a graph on its FX code, the config, and
the Triton source of kernels that custom ops register through `torch.library.triton_op`. Our op
reaches Inductor as `flash::fwd` and is lowered inside AOTAutograd's trace (kernels_in_graph.py),
so neither our kernels' source nor the Python that picks them (mask_tiles, dispatch, the launch
arguments) is in those keys: after an upgrade, or any edit, a warm cache kept serving the old
kernels. Session 18 found it on the GPU: a patched kernel ran in eager calls while the compiled
graph of the same process still launched the old one from /tmp/torchinductor_*. A kernel fix
would have been silently absent from every compiled model until the user cleared the cache.

The same holds for our settings that the lowering reads while a graph is traced: the
FLASH_INDUCTOR_* environment (mask tiles, autotuning, the fused and joint backwards, a forced
kernel) and `flash_inductor.config` (`kernel`, `kernels_in_graph`). A graph compiled under one
setting was served under another.

Inductor's hook for code outside torch that shapes a compiled graph is a custom pass with a
`uuid()`; `fingerprinted_post_grad_pass` adds one that changes nothing in the graph and whose
uuid is a hash of this package's sources plus those settings, beside any post-grad pass the
user configured.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from torch._inductor import custom_graph_pass

PACKAGE = Path(__file__).resolve().parent


def _source_roots() -> list[Path]:
    """The package's directory, and flash_inductor.patterns' where an editable install maps it
    elsewhere (pyproject.toml's package-dir)."""
    from . import patterns

    roots = [PACKAGE]
    for p in map(Path, patterns.__path__):
        if PACKAGE not in p.resolve().parents:
            roots.append(p.resolve())
    return roots


@functools.cache
def source_fingerprint() -> str:
    """sha256 over every Python source of the package (path and bytes, in path order): what a
    compiled graph of ours was built from. Read once per process (about 60 files)."""
    h = hashlib.sha256()
    for i, root in enumerate(_source_roots()):
        for path in sorted(root.rglob("*.py")):
            h.update(f"{i}/{path.relative_to(root).as_posix()}".encode())
            h.update(b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()


def lowering_settings() -> tuple:
    """What our lowering reads besides its sources, as the cache key holds it: every
    FLASH_INDUCTOR_* variable (a superset: the cache and toolkit paths only cost a miss) and the
    compiling thread's `flash_inductor.config`."""
    from .dispatch import config

    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("FLASH_INDUCTOR_")))
    return env + (("config.kernel", config.kernel), ("config.kernels_in_graph", config.kernels_in_graph))


class SourceKeyedPass(custom_graph_pass.CustomGraphPass):
    """A post-grad pass that leaves the graph alone; its uuid puts our sources and settings in
    the cache key.
    `inner`: the user's own post-grad passes, run first (on a torch whose config takes one pass
    only; where it takes a list, ours is appended instead)."""

    def __init__(self, inner: tuple = ()):
        self.inner = inner

    def __call__(self, graph) -> None:
        for p in self.inner:
            p(graph)

    def uuid(self):
        inner = []
        for p in self.inner:
            u = p.uuid() if hasattr(p, "uuid") else None
            if u is None:
                return None  # a pass Inductor cannot key: no caching, as with that pass alone
            inner.append(u)
        return (source_fingerprint(), lowering_settings(), *inner)


def fingerprinted_post_grad_pass(user_pass):
    """The value for Inductor's `post_grad_custom_post_pass`: ours, after the user's if any."""
    if user_pass is None:
        return SourceKeyedPass()
    user = tuple(user_pass) if isinstance(user_pass, (list, tuple)) else (user_pass,)
    if hasattr(custom_graph_pass, "get_custom_graph_passes"):  # the config takes a list
        return [*user, SourceKeyedPass()]
    return SourceKeyedPass(user)
