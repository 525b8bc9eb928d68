"""What a kernel backend declares, and the one gate that turns declarations into reasons.

A backend is a class of facts (devices, compute capability, dtypes, head dims, bias kinds,
dropout, causal alignments) plus `forward`/`backward`. `not_supported_reasons(inputs)` returns
a list of sentences a user can act on; an empty list means the backend accepts the input.
Dispatch (flash_inductor.dispatch) takes the first backend with no reasons.
"""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs, Causal


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped KV heads (dim 1: dense [B, H, N, D] or packed [total, H, D]) repeated to the query
    heads, for kernels without grouped heads (a copy; their dK/dV are summed back)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


class KernelBackend:
    NAME: str = "?"
    DEVICE_TYPES: tuple[str, ...] = ()
    # (major, minor) on CUDA; None when the backend has no such limit.
    MIN_COMPUTE_CAPABILITY: tuple[int, int] | None = None
    SUPPORTED_DTYPES: tuple[torch.dtype, ...] = ()
    SUPPORTED_HEAD_DIMS: tuple[int, int] = (1, 256)  # inclusive range
    HEAD_DIM_MULTIPLE: int = 1
    SUPPORTED_BIAS_KINDS: tuple[str, ...] = ("none", "float", "bool")
    SUPPORTS_BIAS_GRAD: bool = True
    SUPPORTS_DROPOUT: bool = True
    SUPPORTED_CAUSAL: tuple[Causal, ...] = (Causal.NONE, Causal.TOP_LEFT, Causal.BOTTOM_RIGHT)
    SUPPORTS_DIFFERENT_V_DIM: bool = True
    SUPPORTS_SOFTCAP: bool = True
    # Packed variable-length batches (flash_inductor/varlen.py): forward_varlen / backward_varlen.
    SUPPORTS_VARLEN: bool = False
    IS_DETERMINISTIC: bool = True
    # The backend whose kernels run this one's backward, when not its own (None: its own).
    # kernels_in_graph reads it to put that backward in Inductor's graph.
    BACKWARD_KERNEL: str | None = None

    # ---- availability of the backend itself (package missing, build failed, ...) -----------
    def unavailable_reasons(self, device: torch.device) -> list[str]:
        return []

    def device_reasons(self, device: torch.device) -> list[str]:
        reasons = []
        if device.type not in self.DEVICE_TYPES:
            reasons.append(
                f"device={device.type} (supported: {', '.join(self.DEVICE_TYPES)})"
            )
        elif device.type == "cuda" and self.MIN_COMPUTE_CAPABILITY is not None:
            cc = torch.cuda.get_device_capability(device)
            if cc < self.MIN_COMPUTE_CAPABILITY:
                need = ".".join(map(str, self.MIN_COMPUTE_CAPABILITY))
                reasons.append(
                    f"compute capability {cc[0]}.{cc[1]} (needs at least {need})"
                )
        return reasons

    def not_supported_reasons(self, inp: AttentionInputs, varlen: bool = False) -> list[str]:
        """`varlen`: the input is a packed variable-length batch (`inp` is its [1, H, total, D] view)."""
        reasons = self.device_reasons(inp.device)
        if inp.dtype not in self.SUPPORTED_DTYPES:
            names = ", ".join(_dtype_name(d) for d in self.SUPPORTED_DTYPES)
            reasons.append(f"dtype={_dtype_name(inp.dtype)} (supported: {names})")
        lo, hi = self.SUPPORTED_HEAD_DIMS
        for name, d in (("head_dim", inp.head_dim), ("head_dim of v", inp.head_dim_v)):
            if not lo <= d <= hi or d % self.HEAD_DIM_MULTIPLE:
                mult = f", a multiple of {self.HEAD_DIM_MULTIPLE}" if self.HEAD_DIM_MULTIPLE > 1 else ""
                reasons.append(f"{name}={d} (supported: {lo}..{hi}{mult})")
        if inp.head_dim != inp.head_dim_v and not self.SUPPORTS_DIFFERENT_V_DIM:
            reasons.append(
                f"v head_dim {inp.head_dim_v} differs from q/k head_dim {inp.head_dim} "
                "(this kernel needs them equal)"
            )
        if inp.bias_kind not in self.SUPPORTED_BIAS_KINDS:
            reasons.append(
                f"bias of kind {inp.bias_kind!r} (supported: {', '.join(self.SUPPORTED_BIAS_KINDS)})"
            )
        elif inp.bias is not None and inp.bias.requires_grad and not self.SUPPORTS_BIAS_GRAD:
            reasons.append("bias requires grad (this kernel has no bias gradient)")
        if inp.dropout_p > 0 and not self.SUPPORTS_DROPOUT:
            reasons.append(f"dropout_p={inp.dropout_p} (this kernel has no dropout)")
        if inp.softcap and not self.SUPPORTS_SOFTCAP:
            reasons.append(f"softcap={inp.softcap:g} (logit soft-capping is not in this kernel yet)")
        if inp.causal not in self.SUPPORTED_CAUSAL:
            reasons.append(f"causal={inp.causal.name.lower()} (not supported by this kernel)")
        if varlen and not self.SUPPORTS_VARLEN:
            reasons.append("variable-length (packed or nested) input is not in this kernel")
        reasons += self.extra_reasons(inp)
        # Availability last: for CUTLASS it means a build of minutes on first use, which an input
        # the kernels would refuse anyway (a head dim of 64, say) must not pay for.
        if not reasons:
            reasons += self.unavailable_reasons_for(inp)
        return reasons

    def unavailable_reasons_for(self, inp: AttentionInputs) -> list[str]:
        """Availability for this input: the backend's, unless what it runs on depends on the input
        (CUTLASS: a library per head dim and dropout)."""
        return self.unavailable_reasons(inp.device)

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        """Backend-specific limits beyond the declared table."""
        return []

    def backward_kernel(self, inp: AttentionInputs) -> str:
        """The name of the kernels that run this input's backward (`BACKWARD_KERNEL`, or this
        backend's own); kernels_in_graph puts a Triton backward into Inductor's graph."""
        return self.BACKWARD_KERNEL or self.NAME

    # ---- the work ------------------------------------------------------------------------
    def forward(self, inp: AttentionInputs, seed: torch.Tensor | None):
        """Return (out [B,Hq,Nq,Dv] in q.dtype, lse [B,Hq,Nq] float32)."""
        raise NotImplementedError

    def backward(self, inp, seed, out, lse, dout, dlse, bias_requires_grad: bool):
        """Return (dq, dk, dv, dbias or None); dbias has the bias's own shape."""
        raise NotImplementedError
