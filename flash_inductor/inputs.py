"""One normalised description of an attention call, validated once.

Every layer (the public function, the op's fake, each kernel backend, the rewrite's guards)
reads the same `AttentionInputs`, so a limit is written in exactly one place.

Shapes (SDPA's convention)::

    q     [B, Hq,  Nq, D]
    k     [B, Hkv, Nk, D]       Hq % Hkv == 0: query head h reads KV head h // (Hq // Hkv)
    v     [B, Hkv, Nk, Dv]
    bias  broadcastable to [B, Hq, Nq, Nk] (fewer dims are padded on the left, size-1 dims
          are read with stride 0 and never materialised); float = added to the scaled scores,
          bool = keep-mask (True attends, False is masked). A float entry <= MASKED_BIAS
          (-1e30: finfo(float32|bfloat16).min, -inf) masks its key exactly as False does, so
          a row of nothing but such entries is fully masked (zeros, lse = -inf); see
          docs/design.md §3 for what the rewrite does where eager averages such a row.
    softcap  0 (off), or c > 0: the scaled scores become c·tanh(s / c) before the bias and
          masks (Gemma 2's logit soft-capping)
    out   [B, Hq, Nq, Dv]
    lse   [B, Hq, Nq] float32, natural-log logsumexp of each row's scaled, biased scores
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

# Every kernel keeps a [BLOCK, D] tile of q, k and v on chip; 256 is where FlashAttention and
# cuDNN stop too, so a larger head dim is refused at the API rather than by one backend.
MAX_HEAD_DIM = 256
# A float bias at or below this masks its key (what HF's finfo(dtype).min fills mean). fp16's
# -65504 is above it: an fp16 fill is an ordinary bias value.
MASKED_BIAS = -1e30
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Causal(enum.IntEnum):
    """Which keys a query may see when the causal flag is on.

    ``TOP_LEFT`` (SDPA's ``is_causal``): query i sees keys j <= i.  ``BOTTOM_RIGHT``: the
    queries are the last Nq positions of the key sequence (prefill with a KV cache), so query i
    sees keys j <= i + (Nk - Nq).  For Nq=3, Nk=5 (x = attended)::

        TOP_LEFT        BOTTOM_RIGHT
        x . . . .       x x x . .
        x x . . .       x x x x .
        x x x . .       x x x x x

    With BOTTOM_RIGHT and Nq > Nk the first Nq - Nk rows see no key at all: they return zeros
    and lse = -inf, like every fully masked row.
    """

    NONE = 0
    TOP_LEFT = 1
    BOTTOM_RIGHT = 2

    @classmethod
    def parse(cls, causal: bool | str | int | "Causal") -> "Causal":
        if isinstance(causal, Causal):
            return causal
        if causal is False or causal is None:
            return cls.NONE
        if causal is True:
            return cls.TOP_LEFT
        if isinstance(causal, int) and causal in (0, 1, 2):
            return cls(causal)
        names = {"top_left": cls.TOP_LEFT, "bottom_right": cls.BOTTOM_RIGHT, "none": cls.NONE}
        if isinstance(causal, str) and causal.lower() in names:
            return names[causal.lower()]
        raise ValueError(
            f"causal={causal!r} is not understood (accepted: False, True (= 'top_left'), "
            "'top_left', 'bottom_right')"
        )


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and accumulators: float32, or float64 for float64 input (the op's lse
    has this dtype too)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def additive_mask(bias: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the bias as an additive mask in `dtype` with -inf where it masks, the bool of masked
    entries): a bool bias masks where False, a float one at or below MASKED_BIAS. For kernels
    that add the bias as a number (PyTorch's CPU kernel, CUTLASS example 41's), which would
    average a row of finite fills instead of masking it."""
    if bias.dtype == torch.bool:
        masked = ~bias
        return torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(masked, float("-inf")), masked
    masked = bias <= MASKED_BIAS
    return bias.masked_fill(masked, float("-inf")).to(dtype), masked


def unit_last_dim(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` with a unit-stride last dim, copied only when it has not: the kernels read the last
    dim as contiguous (vectorised loads; PyTorch's CPU kernel silently misreads it otherwise)."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def heads_inside(t: torch.Tensor) -> bool:
    """True for a [B, N, H, D] buffer seen as [B, H, N, D]: how every HuggingFace model hands q, k
    and v over (a projection viewed per head, then transposed), and how SDPA's fused kernels
    return their output."""
    return t.dim() == 4 and t.stride(-1) == 1 and t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) < t.stride(2)


def empty_in_layout(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An uninitialised [B, H, N, D] tensor laid out as `like`: heads inside (heads_inside) or
    contiguous. The op's out follows q this way and its gradients follow q, k and v, so a model's
    `out.transpose(1, 2).reshape(B, N, H·D)` is a view and not a copy kernel (one launch and one
    pass over the output per layer, found in BERT's compiled code on the GPU, session 7)."""
    b, h, n, d = like.shape if shape is None else shape
    dtype, device = dtype or like.dtype, like.device
    if heads_inside(like):
        return torch.empty((b, n, h, d), dtype=dtype, device=device).transpose(1, 2)
    return torch.empty((b, h, n, d), dtype=dtype, device=device)


def in_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` itself when it already has `like`'s layout (empty_in_layout), else a copy that has."""
    want = empty_in_layout(like, t.shape, t.dtype)
    if t.stride() == want.stride():
        return t
    return want.copy_(t)


@dataclass(frozen=True)
class AttentionInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None
    causal: Causal
    scale: float
    dropout_p: float
    softcap: float = 0.0

    @classmethod
    def from_op(cls, q, k, v, bias, causal: int, scale: float, dropout_p: float, softcap: float = 0.0):
        """From the ops' arguments. The public functions validated already; ops trust their callers."""
        return cls(q, k, v, bias, Causal(causal), scale, dropout_p, softcap)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def batch(self):
        return self.q.shape[0]

    @property
    def heads_q(self):
        return self.q.shape[1]

    @property
    def heads_kv(self):
        return self.k.shape[1]

    @property
    def len_q(self):
        return self.q.shape[2]

    @property
    def len_k(self):
        return self.k.shape[2]

    @property
    def head_dim(self):
        return self.q.shape[3]

    @property
    def head_dim_v(self):
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def bias_kind(self) -> str:
        """'none', 'bool' (keep-mask) or 'float' (additive)."""
        if self.bias is None:
            return "none"
        return "bool" if self.bias.dtype == torch.bool else "float"

    def bias_4d(self) -> torch.Tensor | None:
        """The bias viewed as 4-D (left-padded with size-1 dims); never copies."""
        if self.bias is None:
            return None
        b = self.bias
        while b.dim() < 4:
            b = b.unsqueeze(0)
        return b

    def bias_broadcast_dims(self) -> tuple[int, ...]:
        """Dims of [B, Hq, Nq, Nk] over which the bias is broadcast (its gradient is summed there)."""
        b = self.bias_4d()
        full = (self.batch, self.heads_q, self.len_q, self.len_k)
        return tuple(i for i in range(4) if b.shape[i] == 1 and full[i] != 1)

    def bias_grad_from_scores(self, ds: torch.Tensor) -> torch.Tensor:
        """The bias's gradient from dS written per score ([B, Hq, Nq, Nk] in the bias's dtype, as
        the kernels write it): the buffer itself for an unbroadcast bias, else summed over the
        broadcast dims in float32."""
        dims = self.bias_broadcast_dims()
        if dims:
            ds = ds.sum(dim=dims, keepdim=True, dtype=torch.float32)
        return ds.reshape(self.bias.shape).to(self.bias.dtype)


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    causal: bool | str | int | Causal = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
) -> AttentionInputs:
    """Check user input against the op's contract; raise ValueError naming the argument and limit."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [batch, heads, seq_len, head_dim], got shape {_shape(t)} "
                f"({t.dim()}-D)"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name}.dtype={t.dtype} is not supported (supported: float16, bfloat16, "
                "float32, float64)"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (dim 0 must match)"
        )
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k {_shape(k)} and v {_shape(v)} must have the same heads (dim 1) and length (dim 2)"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q has {q.shape[1]} heads and k/v have {k.shape[1]}: the query heads must be a "
            "multiple of the key/value heads (GQA/MQA)"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q and k head dims differ: q {_shape(q)} vs k {_shape(k)} (dim 3 must match)"
        )
    for name, d in (("q/k", q.shape[3]), ("v", v.shape[3])):
        if d > MAX_HEAD_DIM:
            raise ValueError(f"{name} head_dim={d} exceeds the limit {MAX_HEAD_DIM}")
        if d < 1:
            raise ValueError(f"{name} head_dim={d} must be at least 1")

    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != torch.bool and not bias.dtype.is_floating_point:
            raise ValueError(
                f"bias.dtype={bias.dtype} is not supported (a float tensor is added to the "
                "scores; a bool tensor is a keep-mask)"
            )
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if bias.dim() > 4 or any(
            b != 1 and b != f for b, f in zip(reversed(bias.shape), reversed(full))
        ):
            raise ValueError(
                f"bias of shape {_shape(bias)} does not broadcast to the score shape "
                f"[batch, heads_q, len_q, len_k] = {list(full)} (each dim must be 1 or equal)"
            )

    c = Causal.parse(causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    elif isinstance(scale, torch.Tensor):
        raise ValueError("scale must be a Python number, not a tensor (fold a tensor scale into q)")
    else:
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale={scale} must be finite")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    if isinstance(softcap, torch.Tensor):
        raise ValueError("softcap must be a Python number or None, not a tensor")
    softcap = 0.0 if softcap is None else float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap={softcap} must be a finite number > 0 (or None / 0 for no soft-capping)")
    return AttentionInputs(q, k, v, bias, c, scale, dropout_p, softcap)
