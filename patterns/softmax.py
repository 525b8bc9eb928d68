"""Softmax over the key dimension, and the casts models put around it.

Spellings: `F.softmax(x, dim=-1)` (BERT, GPT-2, T5), `F.softmax(x, dim=-1, dtype=torch.float32)`
then `.to(q.dtype)` (LLaMA, Mistral, Qwen2, Gemma), `x.softmax(-1)`, `torch.softmax(x, -1)`,
`F.softmax(x.float(), dim=-1).type_as(x)` (older T5 and BART code).
"""

from __future__ import annotations

from flash_inductor.rewrite.fx import Call, example, normalize_dim

from .steps import Refusal


def key_dim_input(call: Call):
    """The softmax's input when it normalises over the last (key) dim; refuse otherwise."""
    x = call["x"]
    ev = example(x)
    dim = call["dim"]
    if ev is None or not isinstance(dim, int):
        raise Refusal("softmax_over_keys", f"softmax dim {dim!r} is not a constant")
    if normalize_dim(dim, ev.dim()) != ev.dim() - 1:
        raise Refusal(
            "softmax_over_keys",
            f"softmax over dim {dim} of a {ev.dim()}-D tensor, not the last (key) dim",
        )
    if ev.dim() < 3:
        raise Refusal("softmax_over_keys", f"softmax input is {ev.dim()}-D; attention scores are 3-D or 4-D")
    return x


def is_cast(call: Call | None) -> bool:
    return call is not None and call.op == "cast"
