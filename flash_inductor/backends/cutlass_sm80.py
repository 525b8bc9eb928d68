"""The Ampere-class CUTLASS kernels (sm_80 code) as a backend: forward and backward, every feature.

What runs: CUTLASS's example 41, the memory-efficient attention kernels (the ones xformers and
PyTorch's "efficient" SDPA backend grew from), instantiated and launched by csrc/sm80_fwd.cuh and
csrc/sm80_bwd.cuh. It is compiled as sm_80 code (mma.sync, cp.async), with SASS for sm_80 and
sm_90 and PTX for later GPUs, so it runs on A100-class GPUs and on Hopper alike.

It takes what the op takes except soft-capping: fp16/bf16, head dims 8..256 in multiples of 8 (v's
may differ), Nq != Nk, grouped KV heads (K and V are repeated to the query heads, a copy, and dK/dV
summed back), an additive or boolean bias of any broadcast shape with its gradient, top-left
causal, bottom-right causal (Nq <= Nk), dropout (curand's Philox, drawn on the device from the
op's seed tensor, so a CUDA graph replay draws a fresh mask; the backward regenerates the same
mask), the lse output and its gradient, and packed variable-length batches (`forward_varlen`,
`backward_varlen`; no bias there, as for every varlen backend).

Where it runs by default: nowhere yet. Dispatch puts it after Triton, because on an H200 the
Triton kernels measured 2.5-3× faster (bf16, B=1, H=12, N=8192, D=128: forward 187 against 484
TFLOP/s, backward 137 against 412; as fast as SDPA's "efficient" backend, its own descendant;
benchmarks/RESULTS.md, session 17), and no A100-class GPU has measured the two side by side;
FLASH_INDUCTOR_KERNEL=cutlass_sm80 selects it. Its library
(`libflash_cutlass_sm80.so`) is built on first use or by `flash-inductor build --family ampere`.

What the glue adds to the kernels, so the op's contract holds (docs/design.md §16):
- bias entries <= -1e30 become -inf (the op's mask contract, §3), in the copy the kernel reads
  (rows padded to 8 elements: the kernel reads 16 bytes at a time); a bool bias becomes 0 / -inf.
- a row with no visible key comes out of the kernel as NaN (0 / 0) with lse = -inf: it is set to
  zeros, and the backward reads lse = +inf there, so its probabilities are 0, not NaN.
- the lse gradient (ring attention, attention sinks) is not in the kernel: its part of the
  gradients is the gradient with dout = 0 (dS = P · dlse; dropout does not touch lse), which the
  Triton backward computes and which is added.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os

import torch

from ..inputs import AttentionInputs, Causal, additive_mask
from .base import KernelBackend, repeat_kv

log = logging.getLogger(__name__)
ENV_VAR = "FLASH_INDUCTOR_CUTLASS"

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
# Built and compiled, not yet run on a GPU: refused until their GPU tests pass (tests/test_cutlass_sm80.py
# empties this set to run them), so no user runs device code that no test has run.
# Session 17 ran forward, backward, dropout, bias and varlen (tests/test_cutlass_sm80.py: 62 passed on
# an H200 and on an H100); session 18 the deterministic backward (one split per (batch, head):
# test_deterministic_backward_repeats_bit_for_bit passed on an H100).
UNVALIDATED: set[str] = set()
_INT32_MAX = 2**31 - 1
_ALIGN = 8  # elements: the kernels read 16 bytes of fp16/bf16 at a time
_LSE_BLOCK = 32  # the forward pads lse rows to a multiple of 32 (the backward reads whole blocks)

_I64x3 = ctypes.c_int64 * 3


class _FwdParams(ctypes.Structure):
    """Mirror of FlashCutlassSm80FwdParams (csrc/flash_cutlass_sm80.h), field for field."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("out", ctypes.c_void_p),
        ("lse", ctypes.c_void_p), ("out_accum", ctypes.c_void_p),
        ("batch", ctypes.c_int32), ("heads", ctypes.c_int32), ("len_q", ctypes.c_int32), ("len_k", ctypes.c_int32),
        ("head_dim", ctypes.c_int32), ("head_dim_v", ctypes.c_int32),
        ("q_stride", _I64x3), ("k_stride", _I64x3), ("v_stride", _I64x3),
        ("scale", ctypes.c_float), ("mask", ctypes.c_int32),
        ("bias", ctypes.c_void_p), ("bias_stride", _I64x3),
        ("cu_seqlens_q", ctypes.c_void_p), ("cu_seqlens_k", ctypes.c_void_p),
        ("dropout_p", ctypes.c_float), ("seed_offset", ctypes.c_void_p), ("stream", ctypes.c_void_p),
    ]


class _BwdParams(ctypes.Structure):
    """Mirror of FlashCutlassSm80BwdParams (csrc/flash_cutlass_sm80.h), field for field."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("out", ctypes.c_void_p),
        ("dout", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("delta", ctypes.c_void_p),
        ("delta_len", ctypes.c_int64),
        ("dq", ctypes.c_void_p), ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p), ("dbias", ctypes.c_void_p),
        ("dbias_row", ctypes.c_int64), ("workspace", ctypes.c_void_p),
        ("batch", ctypes.c_int32), ("heads", ctypes.c_int32), ("len_q", ctypes.c_int32), ("len_k", ctypes.c_int32),
        ("head_dim", ctypes.c_int32), ("head_dim_v", ctypes.c_int32),
        ("q_stride", _I64x3), ("k_stride", _I64x3), ("v_stride", _I64x3), ("dout_stride", _I64x3),
        ("scale", ctypes.c_float), ("mask", ctypes.c_int32),
        ("bias", ctypes.c_void_p), ("bias_stride", _I64x3),
        ("cu_seqlens_q", ctypes.c_void_p), ("cu_seqlens_k", ctypes.c_void_p),
        ("dropout_p", ctypes.c_float), ("seed_offset", ctypes.c_void_p),
        ("num_splits_key", ctypes.c_int32), ("sm_count", ctypes.c_int32), ("stream", ctypes.c_void_p),
    ]


@functools.lru_cache(maxsize=None)
def _library():
    """(the loaded library, None) or (None, why not): built, or found in the cache, once per process."""
    from .. import cutlass_build

    lib, why = cutlass_build.load(cutlass_build.AMPERE, ENV_VAR, log)
    if lib is None:
        return None, why
    err = [ctypes.c_char_p, ctypes.c_int32]
    lib.flash_cutlass_sm80_fwd.restype = ctypes.c_int
    lib.flash_cutlass_sm80_fwd.argtypes = [ctypes.c_int32, ctypes.POINTER(_FwdParams), *err]
    lib.flash_cutlass_sm80_bwd.restype = ctypes.c_int
    lib.flash_cutlass_sm80_bwd.argtypes = [ctypes.c_int32, ctypes.POINTER(_BwdParams), *err]
    lib.flash_cutlass_sm80_fwd_accum_bytes.restype = ctypes.c_int64
    lib.flash_cutlass_sm80_fwd_accum_bytes.argtypes = [ctypes.c_int32, ctypes.POINTER(_FwdParams)]
    lib.flash_cutlass_sm80_bwd_workspace.restype = ctypes.c_int64
    lib.flash_cutlass_sm80_bwd_workspace.argtypes = [ctypes.c_int32, ctypes.POINTER(_BwdParams),
                                                     ctypes.POINTER(ctypes.c_int32)]
    return lib, None


@functools.lru_cache(maxsize=None)
def _built_or_why() -> str | None:
    """None if the library is in the cache (so loading it builds nothing), else why not. Once
    per process: `explain` asks at every rewritten site, and the plan runs nvcc and hashes
    csrc/. A library built later in the process is loaded through `_library`, not this."""
    from .. import cutlass_build

    try:
        built = cutlass_build.plan(family=cutlass_build.AMPERE).library.is_file()
    except cutlass_build.BuildError as e:
        return f"not available ({str(e).splitlines()[0]})"
    if built:
        return None
    return ("not built yet (it builds on first use where FLASH_INDUCTOR_KERNEL=cutlass_sm80 asks for it, "
            "or ahead of time: flash-inductor build --family ampere)")


def _loaded():
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the CUTLASS sm80 library is {why}")
    return lib


def _check(code: int, err, what: str) -> None:
    if code:
        raise RuntimeError(f"CUTLASS sm80 {what} failed: {err.value.decode(errors='replace')}")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Unit-stride last dim, 16-byte-aligned base and strides in multiples of 8 elements, or a copy."""
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % _ALIGN == 0 for s in t.stride()[:-1]):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(groups, q, k, v) as the kernels read them: aligned, grouped KV heads repeated."""
    groups = q.shape[1] // k.shape[1]
    return groups, _aligned(q), _aligned(repeat_kv(k, groups)), _aligned(repeat_kv(v, groups))


def _bhm(t: torch.Tensor) -> _I64x3:
    """Element strides of batch, head and row of a [B, H, N, D] tensor."""
    return _I64x3(t.stride(0), t.stride(1), t.stride(2))


def _packed_bhm(t: torch.Tensor) -> _I64x3:
    """A packed [total, H, D] tensor: no batch stride (offsets locate sequences), head, row."""
    return _I64x3(0, t.stride(1), t.stride(0))


def _mask_code(causal: Causal, len_q: int, len_k: int) -> int:
    if causal == Causal.BOTTOM_RIGHT and len_q == len_k:
        return int(Causal.TOP_LEFT)
    return int(causal)


def _kernel_bias(inp: AttentionInputs) -> tuple[torch.Tensor, _I64x3]:
    """The bias as the kernels read it: [B|1, H|1, Nq|1, Nk padded to 8] in q's dtype, broadcast
    dims at stride 0, masked entries (bool False, or <= -1e30) as -inf. Always a copy: the mask
    contract needs one and the padding another."""
    b4 = inp.bias_4d()
    shape = [b4.shape[i] if b4.shape[i] != 1 and b4.stride(i) != 0 else 1 for i in range(3)]
    src = b4[tuple(slice(0, n) for n in shape)].expand(*shape, inp.len_k)
    row = -(-inp.len_k // _ALIGN) * _ALIGN
    buf = torch.empty(*shape, row, dtype=inp.dtype, device=inp.q.device)
    dst = buf[..., : inp.len_k]
    dst.copy_(additive_mask(src, inp.dtype)[0])
    strides = [0 if shape[i] == 1 else buf.stride(i) for i in range(3)]
    return buf, _I64x3(*strides)


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class CutlassSm80Backend(KernelBackend):
    NAME = "cutlass_sm80"
    DEVICE_TYPES = ("cuda",)
    MIN_COMPUTE_CAPABILITY = (8, 0)
    SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
    SUPPORTED_HEAD_DIMS = (8, 256)
    HEAD_DIM_MULTIPLE = 8
    SUPPORTED_BIAS_KINDS = ("none", "float", "bool")
    SUPPORTS_DROPOUT = True
    SUPPORTS_DIFFERENT_V_DIM = True
    SUPPORTS_SOFTCAP = False
    SUPPORTS_VARLEN = True
    # Split key blocks add their dQ into a float32 workspace in whatever order they finish; under
    # torch.use_deterministic_algorithms(True) the backward runs one split (as PyTorch's own
    # efficient backend does), which is deterministic and slower on small batch · heads.
    IS_DETERMINISTIC = False

    def unavailable_reasons(self, device):
        from ..dispatch import forced_kernel

        if os.environ.get(ENV_VAR, "1") != "0" and forced_kernel() != self.NAME and not _library.cache_info().currsize:
            # Dispatch reaches this backend only after Triton, so `explain` and `info` would
            # build it for nothing: until someone asks for it, only say whether it is built.
            why = _built_or_why()
            return [f"the CUTLASS sm80 library is {why}"] if why else []
        _, why = _library()
        return [f"the CUTLASS sm80 library is {why}"] if why else []

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        if self.device_reasons(inp.device):
            return []
        if any(isinstance(x, torch.SymInt) for x in (*inp.q.shape, *inp.k.shape)):
            return ["symbolic sizes (dynamic shapes): the CUTLASS sm80 limits are checked per call, at run time"]
        reasons = []
        for feature, used in (("forward", True), ("backward", True), ("dropout", inp.dropout_p > 0),
                              ("bias", inp.bias is not None),
                              ("deterministic", torch.are_deterministic_algorithms_enabled())):
            if used and feature in UNVALIDATED:
                reasons.append(f"{feature}: built, awaiting its first GPU test run (Triton runs it)")
        if inp.causal == Causal.BOTTOM_RIGHT and inp.len_q > inp.len_k:
            reasons.append(f"bottom-right causal with len_q={inp.len_q} > len_k={inp.len_k} (rows with no key "
                           "are not in the CUTLASS sm80 kernels)")
        if inp.bias is not None and inp.bias.dtype != torch.bool and inp.bias.dtype != inp.dtype:
            reasons.append(f"a {str(inp.bias.dtype).replace('torch.', '')} bias with "
                           f"{str(inp.dtype).replace('torch.', '')} q (the kernels read the bias in q's dtype)")
        if not (inp.scale > 0 and math.isfinite(inp.scale)):
            reasons.append(f"scale={inp.scale:g} (the CUTLASS sm80 softmax needs a finite scale > 0)")
        if inp.len_q == 0 or inp.len_k == 0:
            reasons.append(f"len_q={inp.len_q}, len_k={inp.len_k} (the kernels need at least one query and one key)")
        biggest = max(t.numel() for t in (inp.q, inp.k, inp.v))
        if biggest > _INT32_MAX or inp.batch * inp.heads_q * inp.len_q * max(inp.head_dim, inp.head_dim_v) > _INT32_MAX:
            reasons.append("a tensor has more than 2^31 elements (the kernels' row strides are 32-bit)")
        return reasons

    # ---- dense ----------------------------------------------------------------------------------

    def forward(self, inp: AttentionInputs, seed):
        lib = _loaded()
        groups, q, k, v = _operands(inp.q, inp.k, inp.v)
        b, h, nq, d = q.shape
        nk, dv = k.shape[2], v.shape[3]
        out = torch.empty(b, nq, h, dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h, -(-nq // _LSE_BLOCK) * _LSE_BLOCK, dtype=torch.float32, device=q.device)
        bias, bias_strides = _kernel_bias(inp) if inp.bias is not None else (None, _I64x3(0, 0, 0))
        with torch.cuda.device(q.device):
            params = _FwdParams(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), None,
                b, h, nq, nk, d, dv, _bhm(q), _bhm(k), _bhm(v), float(inp.scale),
                _mask_code(inp.causal, nq, nk), _ptr(bias), bias_strides, None, None,
                float(inp.dropout_p), _ptr(seed), _stream(q.device))
            accum = self._out_accum(lib, params, b * nq, q.dtype)
            err = ctypes.create_string_buffer(512)
            _check(lib.flash_cutlass_sm80_fwd(_DTYPE_CODES[q.dtype], ctypes.byref(params), err, len(err)), err,
                   "forward")
            del accum  # the kernel is queued on this stream; the caching allocator keeps it until then
        out, lse = out.transpose(1, 2), lse[..., :nq]
        if bias is not None:
            _zero_empty_rows(out, lse)
        return out, lse

    def backward(self, inp, seed, out, lse, dout, dlse, bias_requires_grad):
        lib = _loaded()
        groups, q, k, v = _operands(inp.q, inp.k, inp.v)
        b, h, nq, d = q.shape
        nk, dv = k.shape[2], v.shape[3]
        # out as the forward wrote it, [B, Nq, H, Dv]; the op may have handed it back in q's layout.
        out_rows = out.transpose(1, 2)
        if not out_rows.is_contiguous() or out_rows.data_ptr() % 16:
            out_rows = out_rows.contiguous()
        dout = _aligned(dout)
        lse_len = -(-nq // _LSE_BLOCK) * _LSE_BLOCK
        lse_rows = torch.full((b, h, lse_len), float("inf"), dtype=torch.float32, device=q.device)
        lse_rows[..., :nq] = lse.masked_fill(torch.isneginf(lse), float("inf"))
        delta = torch.empty(b, h, lse_len, dtype=torch.float32, device=q.device)
        dq = torch.empty(b, nq, h, d, dtype=q.dtype, device=q.device)
        dk = torch.empty(b, nk, h, d, dtype=q.dtype, device=q.device)
        dvv = torch.empty(b, nk, h, dv, dtype=q.dtype, device=q.device)
        bias, bias_strides = _kernel_bias(inp) if inp.bias is not None else (None, _I64x3(0, 0, 0))
        dbias_full = None
        if bias_requires_grad:
            # Causal: the kernel skips the masked key blocks and never writes their dS.
            alloc = torch.empty if inp.causal == Causal.NONE else torch.zeros
            dbias_full = alloc(b, h, nq, -(-nk // _ALIGN) * _ALIGN, dtype=q.dtype, device=q.device)
        with torch.cuda.device(q.device):
            params = _BwdParams(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), out_rows.data_ptr(), dout.data_ptr(),
                lse_rows.data_ptr(), delta.data_ptr(), lse_len, dq.data_ptr(), dk.data_ptr(), dvv.data_ptr(),
                _ptr(dbias_full), dbias_full.shape[-1] if dbias_full is not None else 0, None,
                b, h, nq, nk, d, dv, _bhm(q), _bhm(k), _bhm(v), _bhm(dout), float(inp.scale),
                _mask_code(inp.causal, nq, nk), _ptr(bias), bias_strides, None, None,
                float(inp.dropout_p), _ptr(seed), 0,
                torch.cuda.get_device_properties(q.device).multi_processor_count, _stream(q.device))
            self._run_backward(lib, params, q)
        dq, dk, dvv = dq.transpose(1, 2), dk.transpose(1, 2), dvv.transpose(1, 2)
        if groups > 1:
            dk = dk.unflatten(1, (inp.heads_kv, groups)).sum(2)
            dvv = dvv.unflatten(1, (inp.heads_kv, groups)).sum(2)
        dbias = _reduce_to_bias(dbias_full[..., :nk], inp) if dbias_full is not None else None
        if dlse is not None:
            dq, dk, dvv, dbias = _add_lse_gradient(inp, out, lse, dlse, bias_requires_grad, (dq, dk, dvv, dbias))
        return dq, dk, dvv, dbias

    # ---- packed variable-length batches ---------------------------------------------------------

    def forward_varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed, softcap=0.0):
        lib = _loaded()
        causal = Causal(causal)
        if causal == Causal.BOTTOM_RIGHT:
            _check_bottom_right(cu_q, cu_k)
        groups, q, k, v = _operands(q, k, v)
        total_q, h, d = q.shape
        dv = v.shape[2]
        batch = cu_q.numel() - 1
        out = torch.empty(total_q, h, dv, dtype=q.dtype, device=q.device)
        lse_len = -(-max(max_q, 1) // _LSE_BLOCK) * _LSE_BLOCK
        lse = torch.empty(batch, h, lse_len, dtype=torch.float32, device=q.device)
        cq, ck = cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous()
        with torch.cuda.device(q.device):
            params = _FwdParams(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), None,
                batch, h, max(max_q, 1), max(max_k, 1), d, dv, _packed_bhm(q), _packed_bhm(k), _packed_bhm(v),
                float(scale), _mask_code(causal, 0, 1), None, _I64x3(0, 0, 0), cq.data_ptr(), ck.data_ptr(),
                float(dropout_p), _ptr(seed), _stream(q.device))
            accum = self._out_accum(lib, params, total_q, q.dtype)
            err = ctypes.create_string_buffer(512)
            _check(lib.flash_cutlass_sm80_fwd(_DTYPE_CODES[q.dtype], ctypes.byref(params), err, len(err)), err,
                   "varlen forward")
            del accum
        seq, pos = _packed_positions(cq, total_q)
        lse_packed = lse.transpose(1, 2)[seq, pos]  # [total_q, H]
        _zero_empty_rows(out, lse_packed)  # sequences with no keys
        return out, lse_packed

    def backward_varlen(self, dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, seed, out, lse, causal, scale,
                        dropout_p, softcap=0.0):
        lib = _loaded()
        causal = Causal(causal)
        q_in, k_in, v_in = q, k, v
        hkv = k.shape[1]
        groups, q, k, v = _operands(q, k, v)
        total_q, h, d = q.shape
        total_k, dv = k.shape[0], v.shape[2]
        batch = cu_q.numel() - 1
        cq, ck = cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous()
        out_rows = out if out.is_contiguous() and out.data_ptr() % 16 == 0 else out.contiguous()
        dout = _aligned(dout)
        lse_len = -(-max(max_q, 1) // _LSE_BLOCK) * _LSE_BLOCK
        lse_rows = torch.full((batch, h, lse_len), float("inf"), dtype=torch.float32, device=q.device)
        seq, pos = _packed_positions(cq, total_q)
        lse_rows.transpose(1, 2)[seq, pos] = lse.masked_fill(torch.isneginf(lse), float("inf"))
        # delta is indexed by the packed row (a block past the last one is read).
        delta_len = -(-(total_q + 128) // _ALIGN) * _ALIGN
        delta = torch.empty(h, delta_len, dtype=torch.float32, device=q.device)
        dq = torch.empty(total_q, h, d, dtype=q.dtype, device=q.device)
        dk = torch.empty(total_k, h, d, dtype=q.dtype, device=q.device)
        dvv = torch.empty(total_k, h, dv, dtype=q.dtype, device=q.device)
        with torch.cuda.device(q.device):
            params = _BwdParams(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), out_rows.data_ptr(), dout.data_ptr(),
                lse_rows.data_ptr(), delta.data_ptr(), delta_len, dq.data_ptr(), dk.data_ptr(), dvv.data_ptr(),
                None, 0, None, batch, h, max(max_q, 1), max(max_k, 1), d, dv,
                _packed_bhm(q), _packed_bhm(k), _packed_bhm(v), _packed_bhm(dout), float(scale),
                _mask_code(causal, 0, 1), None, _I64x3(0, 0, 0), cq.data_ptr(), ck.data_ptr(),
                float(dropout_p), _ptr(seed), _varlen_splits(max_k, total_k, batch),
                torch.cuda.get_device_properties(q.device).multi_processor_count, _stream(q.device))
            self._run_backward(lib, params, q)
        if groups > 1:
            dk = dk.unflatten(1, (hkv, groups)).sum(2)
            dvv = dvv.unflatten(1, (hkv, groups)).sum(2)
        if dlse is not None:
            from .triton import TritonBackend

            # The lse gradient's part (dS = P·dlse): the gradient with dout = 0 and no dropout.
            extra = TritonBackend().backward_varlen(torch.zeros_like(dout), dlse, q_in, k_in, v_in, cu_q, cu_k,
                                                    max_q, max_k, None, out, lse, int(causal), scale, 0.0, softcap)
            dq, dk, dvv = dq + extra[0], dk + extra[1], dvv + extra[2]
        return dq, dk, dvv

    # ---- shared ---------------------------------------------------------------------------------

    @staticmethod
    def _out_accum(lib, params: _FwdParams, rows: int, dtype: torch.dtype):
        """The float32 output buffer the head-dim-256 instances rescale into, or None."""
        per_row = lib.flash_cutlass_sm80_fwd_accum_bytes(_DTYPE_CODES[dtype], ctypes.byref(params))
        if per_row < 0:
            raise RuntimeError(f"CUTLASS sm80: no forward instance for head_dim={params.head_dim}")
        if per_row == 0:
            return None
        buf = torch.empty(rows * per_row // 4, dtype=torch.float32, device=torch.cuda.current_device())
        params.out_accum = buf.data_ptr()
        return buf

    @staticmethod
    def _run_backward(lib, params: _BwdParams, q: torch.Tensor) -> None:
        if torch.are_deterministic_algorithms_enabled():
            params.num_splits_key = 1  # one program per (batch, head) adds its dQ in key order
        dtype = _DTYPE_CODES[q.dtype]
        zero = ctypes.c_int32(0)
        size = lib.flash_cutlass_sm80_bwd_workspace(dtype, ctypes.byref(params), ctypes.byref(zero))
        if size < 0:
            raise RuntimeError(f"CUTLASS sm80: no backward instance for head_dim={params.head_dim}")
        workspace = None
        if size > 0:
            alloc = torch.zeros if zero.value else torch.empty
            workspace = alloc(-(-size // 4), dtype=torch.float32, device=q.device)
            params.workspace = workspace.data_ptr()
        err = ctypes.create_string_buffer(512)
        _check(lib.flash_cutlass_sm80_bwd(dtype, ctypes.byref(params), err, len(err)), err, "backward")
        del workspace  # queued on this stream: the caching allocator holds it until the kernel is done


def _zero_empty_rows(out: torch.Tensor, lse: torch.Tensor) -> None:
    """A row with no visible key: the kernel divides 0 by 0; the op returns zeros (lse is -inf)."""
    out.masked_fill_(torch.isneginf(lse).unsqueeze(-1), 0.0)


def _reduce_to_bias(dfull: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
    """The full [B, H, Nq, Nk] bias gradient summed over the bias's broadcast dims, in its shape."""
    dims = inp.bias_broadcast_dims()
    g = dfull.float().sum(dims, keepdim=True) if dims else dfull
    return g.reshape(inp.bias.shape).to(inp.bias.dtype)


def _add_lse_gradient(inp, out, lse, dlse, bias_requires_grad, grads):
    """The lse gradient's part of every gradient: the gradient with dout = 0 and no dropout (dS = P·dlse)."""
    from .triton import TritonBackend

    plain = AttentionInputs.from_op(inp.q, inp.k, inp.v, inp.bias, int(inp.causal), inp.scale, 0.0, inp.softcap)
    extra = TritonBackend().backward(plain, None, out, lse, torch.zeros_like(out), dlse, bias_requires_grad)
    return tuple(g if e is None else g + e for g, e in zip(grads, extra))


def _varlen_splits(max_k: int, total_k: int, batch: int) -> int:
    """Key-block splits for a packed backward. One program per (sequence, head) loops over its
    sequence's keys, so the longest sequence sets the time (session 17: 69% of the dense rate at
    lengths 128..8192, against 98% in the forward); split every sequence's keys so that the
    longest's programs are about half the mean's length. 0 (the library's occupancy rule) when
    the lengths are even."""
    mean_k = max(total_k / max(batch, 1), 1.0)
    ratio = max_k / mean_k
    if ratio < 1.5:
        return 0
    return max(1, min(-(-max(max_k, 1) // 64), math.ceil(2 * ratio)))


def _packed_positions(cu_q: torch.Tensor, total_q: int):
    """For each packed row: its sequence and its position in it (to move lse between layouts)."""
    rows = torch.arange(total_q, device=cu_q.device, dtype=torch.int32)
    seq = torch.searchsorted(cu_q[1:].contiguous(), rows, right=True)
    return seq, rows - cu_q[seq]


def _check_bottom_right(cu_q: torch.Tensor, cu_k: torch.Tensor) -> None:
    longer = (cu_q.diff() > cu_k.diff()).nonzero()
    if longer.numel():
        i = int(longer[0])
        raise ValueError(f"causal='bottom_right' with sequence {i} longer in queries than in keys "
                         f"(cu_seqlens_q/cu_seqlens_k): the CUTLASS sm80 kernels need len_q <= len_k per sequence; "
                         "unset FLASH_INDUCTOR_KERNEL=cutlass_sm80 to run it with Triton")
