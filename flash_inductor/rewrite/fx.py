"""A canonical view of Dynamo FX nodes, so patterns match meaning instead of spelling.

Dynamo records torch-level calls: `torch.matmul`, `operator.matmul` (`@`), `Tensor.matmul`,
`torch.bmm` all compute a batched product; `F.softmax`, `torch.softmax` and `Tensor.softmax`
are one softmax. `canon(node)` maps each to one `Call(op, args)` with arguments bound by name,
so the pattern families in flash_inductor.patterns never see the spelling.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import Node

_MISSING = object()


@dataclass
class Call:
    op: str
    node: Node
    args: dict = field(default_factory=dict)
    spelling: str = ""

    def __getitem__(self, name):
        return self.args[name]

    def get(self, name, default=None):
        return self.args.get(name, default)


# canonical op -> parameter names (after `self`/input); defaults for the optional ones
_SIGS = {
    "matmul": (["a", "b"], {}),
    "baddbmm": (["input", "a", "b"], {"beta": 1, "alpha": 1}),
    "transpose": (["x", "dim0", "dim1"], {}),
    "permute": (["x", "dims"], {}),
    "softmax": (["x", "dim"], {"dtype": None, "_stacklevel": 3}),
    "dropout": (["x"], {"p": 0.5, "training": True, "inplace": False}),
    "mul": (["a", "b"], {}),
    "div": (["a", "b"], {"rounding_mode": None}),
    "add": (["a", "b"], {"alpha": 1}),
    "sub": (["a", "b"], {"alpha": 1}),
    "masked_fill": (["x", "mask", "value"], {}),
    "where": (["cond", "a", "b"], {}),
    "expand": (["x", "sizes"], {}),
    "reshape": (["x", "shape"], {}),
    "unsqueeze": (["x", "dim"], {}),
    "tanh": (["x"], {}),
    "clamp_min": (["x", "floor"], {}),
    "getitem": (["x", "index"], {}),
    "repeat_interleave": (["x", "repeats", "dim"], {"output_size": None}),
    "sdpa": (
        ["query", "key", "value"],
        {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
    ),
}

_FUNCTIONS = {
    torch.matmul: ("matmul", None),
    operator.matmul: ("matmul", None),
    torch.bmm: ("matmul", None),
    torch.baddbmm: ("baddbmm", None),
    torch.transpose: ("transpose", None),
    torch.permute: ("permute", None),
    F.softmax: ("softmax", ["x", "dim", "_stacklevel", "dtype"]),
    torch.softmax: ("softmax", ["x", "dim", "dtype"]),
    torch.special.softmax: ("softmax", ["x", "dim", "dtype"]),
    F.dropout: ("dropout", ["x", "p", "training", "inplace"]),
    torch.dropout: ("dropout", ["x", "p", "training"]),
    operator.mul: ("mul", None),
    operator.imul: ("mul", None),
    torch.mul: ("mul", None),
    torch.multiply: ("mul", None),
    operator.truediv: ("div", None),
    operator.itruediv: ("div", None),
    torch.div: ("div", None),
    torch.true_divide: ("div", None),
    torch.divide: ("div", None),
    operator.add: ("add", None),
    operator.iadd: ("add", None),
    torch.add: ("add", None),
    operator.sub: ("sub", None),
    operator.isub: ("sub", None),
    torch.sub: ("sub", None),
    torch.masked_fill: ("masked_fill", None),
    torch.where: ("where", None),
    torch.unsqueeze: ("unsqueeze", None),
    torch.tanh: ("tanh", None),
    torch.maximum: ("clamp_min", ["x", "floor"]),
    torch.clamp_min: ("clamp_min", ["x", "floor"]),
    F.tanh: ("tanh", None),
    operator.getitem: ("getitem", None),
    torch.repeat_interleave: ("repeat_interleave", None),
    torch.reshape: ("reshape", None),
    F.scaled_dot_product_attention: ("sdpa", None),
}

_METHODS = {
    "matmul": "matmul",
    "bmm": "matmul",
    "__matmul__": "matmul",
    "baddbmm": "baddbmm",
    "transpose": "transpose",
    "permute": "permute",
    "softmax": "softmax",
    "mul": "mul",
    "mul_": "mul",
    "__mul__": "mul",
    "div": "div",
    "div_": "div",
    "true_divide": "div",
    "__truediv__": "div",
    "add": "add",
    "add_": "add",
    "__add__": "add",
    "sub": "sub",
    "sub_": "sub",
    "masked_fill": "masked_fill",
    "masked_fill_": "masked_fill",
    "expand": "expand",
    "reshape": "reshape",
    "view": "reshape",
    "unsqueeze": "unsqueeze",
    "repeat_interleave": "repeat_interleave",
    "tanh": "tanh",
    "clamp_min": "clamp_min",
    "maximum": "clamp_min",
}
IN_PLACE_METHODS = {"mul_", "div_", "add_", "sub_", "masked_fill_"}
_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as"}
# Methods whose trailing args are a varargs list (x.permute(0, 2, 1, 3), x.view(a, b)).
_VARARG_METHODS = {"permute": "dims", "expand": "sizes", "reshape": "shape"}


def example(node) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node (None for non-tensors)."""
    if isinstance(node, Node):
        v = node.meta.get("example_value", node.meta.get("val"))
        return v if isinstance(v, torch.Tensor) else None
    return None


def _sdpa_functions():
    fns = {F.scaled_dot_product_attention}
    c_fn = getattr(torch._C._nn, "scaled_dot_product_attention", None)
    if c_fn is not None:
        fns.add(c_fn)
    return fns


for _fn in _sdpa_functions():
    _FUNCTIONS[_fn] = ("sdpa", None)


def _bind(op: str, args: tuple, kwargs: dict, names=None) -> dict | None:
    params, defaults = _SIGS[op]
    names = names or (params + [k for k in defaults])
    bound = dict(defaults)
    if len(args) > len(names):
        return None
    for name, a in zip(names, args):
        bound[name] = a
    # torch's keyword names -> ours (`torch.add(x, other=y)`, `torch.dropout(x, p, train=...)`)
    aliases = {"input": names[0], "self": names[0], "other": "b", "mat2": "b", "train": "training",
               "condition": "cond", "batch1": "a", "batch2": "b", "size": "sizes"}
    if op == "where":  # torch.where(condition, input, other)
        aliases["input"] = "a"
    for k, a in kwargs.items():
        bound[aliases.get(k, k)] = a
    if any(p not in bound for p in params):
        return None
    return bound


def _clamp_min_call(node: Node) -> Call | None:
    """`torch.max(x, y)` (elementwise: y a tensor or number, not a dim) and
    `clamp(x, min=c)` without a max, as one `clamp_min(x, floor)`."""
    args, kwargs = node.args, node.kwargs
    if node.target is torch.max or (node.op == "call_method" and node.target == "max"):
        if len(args) == 2 and not kwargs and not isinstance(args[1], (int, bool)):
            return Call("clamp_min", node, {"x": args[0], "floor": args[1]}, "max")
        return None
    lo = kwargs.get("min", args[1] if len(args) > 1 else None)
    hi = kwargs.get("max", args[2] if len(args) > 2 else None)
    if lo is None or hi is not None:
        return None
    return Call("clamp_min", node, {"x": args[0], "floor": lo}, "clamp")


def canon(node) -> Call | None:
    """The canonical call a node makes, or None when it is not one the patterns know."""
    if not isinstance(node, Node):
        return None
    if (node.op == "call_function" and node.target in (torch.max, torch.clamp)) or (
        node.op == "call_method" and node.target in ("max", "clamp") and node.args
    ):
        return _clamp_min_call(node)
    if node.op == "call_function":
        entry = _FUNCTIONS.get(node.target)
        if entry is None:
            return None
        op, names = entry
        bound = _bind(op, node.args, node.kwargs, names)
        if bound is None:
            return None
        return Call(op, node, bound, getattr(node.target, "__name__", str(node.target)))
    if node.op == "call_method":
        name = node.target
        if name in _CAST_METHODS:
            return Call("cast", node, {"x": node.args[0]}, name)
        op = _METHODS.get(name)
        if op is None:
            return None
        args = node.args
        if name in _VARARG_METHODS or op in _VARARG_METHODS:
            key = _VARARG_METHODS[op]
            rest = args[1:]
            if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
                rest = rest[0]
            bound = {"x": args[0], key: tuple(rest)}
            return Call(op, node, bound, name)
        bound = _bind(op, args, node.kwargs)
        if bound is None:
            return None
        return Call(op, node, bound, name)
    return None


def constant_value(x):
    """A Python number for a literal or a 0-d constant tensor node (torch.full([], c), torch.tensor(c))."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, Node) and x.op == "call_function":
        if x.target is torch.full:
            size = x.args[0] if x.args else x.kwargs.get("size")
            fill = x.args[1] if len(x.args) > 1 else x.kwargs.get("fill_value")
            if tuple(size) in ((), (1,)) and isinstance(fill, (int, float)) and not isinstance(fill, bool):
                return float(fill)
        if x.target is torch.tensor and x.args and isinstance(x.args[0], (int, float)):
            return float(x.args[0])
    return None


def is_scalar_like(x) -> bool:
    """A Python number, a SymInt/SymFloat node, or a one-element tensor node: something a scale can be."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return math.isfinite(x)
    if isinstance(x, Node):
        ev = x.meta.get("example_value", x.meta.get("val"))
        if isinstance(ev, (torch.SymInt, torch.SymFloat, int, float)):
            return True
        if isinstance(ev, torch.Tensor):
            return ev.numel() == 1 and ev.dim() == 0
    return False


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim
