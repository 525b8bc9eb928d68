"""Emit replacement nodes into a Dynamo graph with the metadata Inductor's passes read.

Each new node gets `example_value` computed by running its target on the inputs' fake tensors
in the graph's fake mode, as Dynamo itself records it; symbolic shapes flow through unchanged.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from .fx import example


def _value(a):
    if isinstance(a, Node):
        return a.meta.get("example_value", a.meta.get("val"))
    return a


def _fake_mode(args):
    for a in args:
        ev = example(a) if isinstance(a, Node) else None
        if ev is not None and hasattr(ev, "fake_mode"):
            return ev.fake_mode
    return None


class Emitter:
    def __init__(self, graph: Graph, before: Node):
        self.graph = graph
        self.before = before
        self.created: list[Node] = []

    def _finish(self, node: Node, fn, args, kwargs) -> Node:
        vals = map_arg(args, _value)
        kvals = map_arg(kwargs, _value)
        nodes = []
        map_arg(args, lambda n: nodes.append(n))
        mode = _fake_mode(nodes)
        if mode is not None:
            with mode:
                node.meta["example_value"] = fn(*vals, **kvals)
        else:
            node.meta["example_value"] = fn(*vals, **kvals)
        self.created.append(node)
        return node

    def call(self, target, *args, **kwargs) -> Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.call_function(target, args, kwargs)
        return self._finish(node, target, args, kwargs)

    def call_method(self, name: str, *args, **kwargs) -> Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.call_method(name, args, kwargs)
        return self._finish(node, lambda s, *a, **k: getattr(s, name)(*a, **k), args, kwargs)

    def rollback(self) -> None:
        """Erase what this emitter added (a guard refused the site after emission began)."""
        for node in reversed(self.created):
            if not node.users:
                self.graph.erase_node(node)
        self.created.clear()
