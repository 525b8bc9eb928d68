"""The CUTLASS kernels (csrc/) as a backend: Hopper forward and backward, Triton's backward where
the CUTLASS one does not reach.

It runs the forward of fp16/bf16 attention with head dims 64, 128 and 256 on sm_90 (H100/H200):
no mask, top-left causal, bottom-right causal with Nq <= Nk, grouped KV heads (GQA/MQA), and an
additive bias in q's dtype of any broadcast shape: at head dim 128 loaded by TMA beside K and V
(csrc/fwd_bias_tma.cuh; shapes TMA cannot take are refused in words, `_tma_bias_reasons`), at
64 and 256 read in the softmax. Grouped KV heads are
run by folding each KV head's G query heads into its rows ([B, Hkv, G·Nq, D], a free view of
contiguous q): exact without a mask; with causal, when Nq = Nk is a multiple of the block's rows
(`block_rows`: 128, or 192 at head dim 64 without bias or dropout; a block then never straddles
two heads, and the mask reads row mod Nk); the bias is read per folded row. Dropout (csrc/fwd_dropout.cuh, a
library of its own built on the first forward with dropout) draws the Triton kernels' Philox keep
bits, so either backward (the CUTLASS one, or Triton's) regenerates the mask from the seed
alone. Head dim 64 (its own libraries, a 192-row tile) runs here only from
`D64_MIN_SCORES` scores up: below, Triton's kernels in Inductor's graph cost less host time.
Mask-like biases (bool, or one float mask for every head) go to Triton: its mask tiles skip their
fully masked tiles, which this kernel would compute.

Its backward (csrc/bwd_kernel.cuh, a library per head dim built on the first backward) takes
head dims 64 and 128: every mask, grouped KV heads folded as in the forward, the lse gradient, the
forward's bias (its tiles through shared memory) and its gradient (dS written per score through
the same buffer, summed over the bias's broadcast dims in torch as Triton's is), and dropout (the
forward's keep bits redrawn by the kernel's spare load warps; a library of its own, built on the
first backward with dropout); its dK/dV come out in k's and v's layout, dQ in q's. Head dim 256
has a backward kernel of its own (csrc/bwd_d256.cuh: 64 x 64 tiles, as example 88's do not fit
its shared memory) taking the same inputs: the bias read and its gradient stored from registers,
the keep bits redrawn by every thread for its own scores (libraries hopper_bwd_d256 and
hopper_bwd_dropout_d256). A feature
that passes its GPU tests but measured slower than Triton's backward is refused with its
figures (`SLOWER_THAN_TRITON`; empty today).
Elsewhere the Triton backward runs: both need only the forward's
output and lse (natural log, the same contract), and `backward_reasons` says why Triton runs
one. Everything else it refuses with the reason, and dispatch moves on to Triton. A
feature built but not yet run by the GPU tests is listed in `UNVALIDATED` and refused until
they pass.

The library is built on first use (flash_inductor/cutlass_build.py; minutes, once per machine
and source version) or ahead of time by `flash-inductor build`. A missing toolkit, missing
headers or a failed build is reported once, as a warning with the reason, and then as this
backend's refusal reason in `explain`; Triton runs instead. FLASH_INDUCTOR_CUTLASS=0 turns the
backend off without trying to build.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math

import torch

from ..cutlass_build import BWD_HEAD_DIMS, TMA_BIAS_HEAD_DIMS
from ..inputs import AttentionInputs, Causal, empty_in_layout
from ..inputs import unit_last_dim as _unit_last
from .base import KernelBackend
from .triton import TritonBackend

log = logging.getLogger(__name__)
ENV_VAR = "FLASH_INDUCTOR_CUTLASS"

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
# Built and compiled, not yet run on a GPU: refused until their GPU tests pass (tests/test_cutlass.py
# empties this set to run them), so no user runs device code that no test has run.
UNVALIDATED: set[str] = set()
# Built and passing their GPU tests, but measured slower than the Triton kernel for the same
# input: refused by dispatch with the figures (benchmarks/RESULTS.md), run where a test or a
# benchmark empties this (dispatch prefers CUTLASS only where it is faster).
# Keys: "bias backward". Empty since session 22 (the bias backward's tiles through shared memory:
# 450 / 364 TFLOP/s against Triton's 326 / 276, with the gradient 374 / 291 against 283 / 218;
# benchmarks/RESULTS.md, session 22).
SLOWER_THAN_TRITON: dict[str, str] = {}

# csrc/flash_cutlass.h's FlashCutlassMask
NO_MASK, TOP_LEFT, BOTTOM_RIGHT, FOLDED = 0, 1, 2, 3
TILE_M = 128  # query rows per CUTLASS forward block at head dims 128 and 256
BWD_TILE_KEYS = 128  # keys per block of the CUTLASS backward (csrc/bwd_kernel.cuh's BwdTileFor)
D64_BLOCK_ROWS = 192  # and at head dim 64 without a bias or dropout (csrc/fwd_kernel.cuh's TileFor)
# Head dim 64 runs on CUTLASS from this many scores (B*H*Nq*Nk) up. Below it the Triton kernels,
# which Inductor launches from its graph, cost less host time than the opaque CUTLASS op: models
# of head dim 64 are mostly small (BERT, GPT-2, T5) and host-bound under torch.compile
# (docs/design.md §17). Measured (H100, H=12, session 25): at N=8192 (2^29.6 scores) the CUTLASS
# forward runs 510 TFLOP/s against Triton's 426 and its backward 360 / 306 (no mask / causal)
# against 350 / 235; at N <= 4096 every compiled backward timed was host-bound (about 1 ms of
# wall time either way), the opaque CUTLASS one 100-350 µs slower.
D64_MIN_SCORES = 2**28


def block_rows(head_dim: int, bias: bool, dropout: bool) -> int:
    """Query rows per block of the CUTLASS forward (a block of folded grouped-KV rows must not
    straddle two query heads): head dim 64 without a bias or dropout runs three consumer
    warpgroups (with them, three would spill: csrc/fwd_kernel.cuh's TileFor)."""
    return D64_BLOCK_ROWS if head_dim == 64 and not (bias or dropout) else TILE_M


_INT32_MAX = 2**31 - 1


class _Params(ctypes.Structure):
    """Mirror of FlashCutlassFwdParams in csrc/flash_cutlass.h (field for field)."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p),
        ("batch", ctypes.c_int32), ("heads", ctypes.c_int32), ("len_q", ctypes.c_int32),
        ("len_k", ctypes.c_int32), ("head_dim", ctypes.c_int32),
        ("q_stride", ctypes.c_int64 * 3), ("k_stride", ctypes.c_int64 * 3),
        ("v_stride", ctypes.c_int64 * 3), ("out_stride", ctypes.c_int64 * 3),
        ("scale", ctypes.c_float), ("sm_count", ctypes.c_int32), ("stream", ctypes.c_void_p),
        ("bias", ctypes.c_void_p), ("bias_stride", ctypes.c_int64 * 3),
        ("groups", ctypes.c_int32), ("rows_per_head", ctypes.c_int32),
        ("seed", ctypes.c_void_p), ("dropout_p", ctypes.c_float), ("drop_threshold", ctypes.c_uint32),
    ]


class _BwdParams(ctypes.Structure):
    """Mirror of FlashCutlassBwdParams in csrc/flash_cutlass_bwd.h (field for field)."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("dout", ctypes.c_void_p),
        ("lse", ctypes.c_void_p), ("delta", ctypes.c_void_p), ("dq_acc", ctypes.c_void_p),
        ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p),
        ("batch", ctypes.c_int32), ("heads", ctypes.c_int32), ("len_q", ctypes.c_int32),
        ("len_k", ctypes.c_int32), ("head_dim", ctypes.c_int32),
        ("q_stride", ctypes.c_int64 * 3), ("k_stride", ctypes.c_int64 * 3), ("v_stride", ctypes.c_int64 * 3),
        ("dout_stride", ctypes.c_int64 * 3), ("dk_stride", ctypes.c_int64 * 3), ("dv_stride", ctypes.c_int64 * 3),
        ("scale", ctypes.c_float), ("sm_count", ctypes.c_int32), ("stream", ctypes.c_void_p),
        ("bias", ctypes.c_void_p), ("bias_stride", ctypes.c_int64 * 3),
        ("groups", ctypes.c_int32), ("rows_per_head", ctypes.c_int32),
        ("dbias", ctypes.c_void_p), ("dbias_stride", ctypes.c_int64 * 3),
        ("seed", ctypes.c_void_p), ("dropout_p", ctypes.c_float), ("drop_threshold", ctypes.c_uint32),
    ]


def _dropout_threshold(p: float) -> int:
    from ..kernels import triton_attention

    return triton_attention.dropout_threshold(p)


@functools.lru_cache(maxsize=None)
def _bwd_library(dropout: bool = False, head_dim: int = 128):
    """The backward's library for a head dim (a family per head dim, built on the first backward
    that can use it); dropout's instances are another (built on the first backward with dropout)."""
    from .. import cutlass_build

    lib, why = cutlass_build.load(cutlass_build.bwd_family(head_dim, dropout), ENV_VAR, log)
    if lib is None:
        return None, why
    return declare_bwd(lib), None


def declare_bwd(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The backward entry point's signature on a loaded backward library (also for the variants
    benchmarks/cutlass_bwd_time.py builds)."""
    lib.flash_cutlass_bwd.restype = ctypes.c_int
    lib.flash_cutlass_bwd.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(_BwdParams), ctypes.c_char_p,
                                      ctypes.c_int32]
    return lib


@functools.lru_cache(maxsize=None)
def _library(dropout: bool = False, head_dim: int = 128):
    """(the loaded library, None) or (None, why not): built, or found in the cache, once per process.
    Dropout's instances are a library of their own (built on the first forward with dropout), and
    so are head dim 64's (cutlass_build.fwd_family)."""
    from .. import cutlass_build

    lib, why = cutlass_build.load(cutlass_build.fwd_family(head_dim, dropout), ENV_VAR, log)
    if lib is None:
        return None, why
    return declare(lib), None


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The C entry points' signatures (csrc/flash_cutlass.h) on a loaded Hopper library; also
    for libraries built elsewhere (benchmarks/cutlass_variants.py)."""
    lib.flash_cutlass_fwd.restype = ctypes.c_int
    lib.flash_cutlass_fwd.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(_Params), ctypes.c_char_p,
                                      ctypes.c_int32]
    lib.flash_cutlass_bias_read.restype = ctypes.c_int
    lib.flash_cutlass_bias_read.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(_Params)]
    return lib


def _effective_causal(inp: AttentionInputs) -> Causal:
    """Bottom-right alignment with Nq = Nk is top-left."""
    if inp.causal == Causal.BOTTOM_RIGHT and inp.len_q == inp.len_k:
        return Causal.TOP_LEFT
    return inp.causal


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * 3)(t.stride(0), t.stride(1), t.stride(2))


def _bias_ready(inp: AttentionInputs) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The bias as the kernels read it: [B|1, H|1, Nq|1, Nk] with unit key stride, the address
    and every stride even (two keys per 32-bit load), and the batch, head and row strides (0 on
    broadcast dims). Anything else (keys strided apart as in T5's permuted position bias, a
    bias broadcast over keys, an odd row length) is copied once, rows padded to a multiple of 8
    (16 bytes: what the head-dim-128 kernels need to load bias tiles by TMA); the kernel never
    reads the padding. At head dim 128 the bias is also copied when its address or strides are
    not 16-byte multiples (TMA's alignment; `_tma_bias_reasons` has already refused the shapes a
    copy cannot fix)."""
    b4 = inp.bias_4d()
    strides = [0 if b4.shape[i] == 1 else b4.stride(i) for i in range(3)]
    # Head dim 128 loads bias tiles by TMA: 16-byte-aligned base and strides, or a copy.
    align, stride_align = (16, 8) if inp.head_dim in TMA_BIAS_HEAD_DIMS else (4, 2)
    if (b4.shape[3] != inp.len_k or (inp.len_k > 1 and b4.stride(3) != 1) or b4.data_ptr() % align
            or any(s % stride_align for s in strides)):
        # Only the dims the bias really varies along are copied; broadcast ones stay size 1.
        shape = [b4.shape[i] if b4.shape[i] != 1 and b4.stride(i) != 0 else 1 for i in range(3)]
        src = b4[tuple(slice(0, n) for n in shape)].expand(*shape, inp.len_k)
        padded = torch.empty(*shape, -(-inp.len_k // 8) * 8, dtype=b4.dtype, device=b4.device)
        b4 = padded[..., : inp.len_k]
        b4.copy_(src)
        strides = [0 if shape[i] == 1 else b4.stride(i) for i in range(3)]
    return b4, tuple(strides)


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """TMA reads rows of 16-byte-aligned addresses with unit-stride head dims; anything else is
    copied once (a strided view of a larger buffer, say)."""
    elems = 16 // t.element_size()
    if t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(s % elems == 0 for s in t.stride()[:3]):
        return t
    # Not .contiguous(): a contiguous view at a misaligned offset would come back unchanged.
    return t.clone(memory_format=torch.contiguous_format)


def _tma_bias_reasons(inp: AttentionInputs) -> list[str]:
    """What keeps a bias from the head-dim-128 instances, which load it by TMA (the mirror of
    csrc/flash_cutlass.h's flash_cutlass_bias_tma_ok, on shapes, so it holds for traced values;
    alignment is fixed by `_bias_ready`'s copy). Triton runs these: CUTLASS's other bias read is
    no faster than Triton's there, so it is not built at this head dim."""
    b4 = inp.bias_4d()
    reasons = []
    if inp.len_q > 1 and (b4.shape[2] == 1 or b4.stride(2) == 0):
        reasons.append("a bias broadcast over query rows at head_dim=128 (the CUTLASS kernel loads bias tiles by "
                       "TMA, which cannot step a row stride of 0; Triton runs it as fast as CUTLASS's other bias "
                       "read would)")
    if inp.len_k % 8:
        reasons.append(f"a bias with len_k={inp.len_k} at head_dim=128 (TMA loads bias rows of 16-byte multiples: "
                       "len_k a multiple of 8; a padded copy would cost more than Triton's kernel)")
    if inp.heads_q != inp.heads_kv and inp.len_q % TILE_M:
        reasons.append(f"a bias with grouped KV heads and len_q={inp.len_q} at head_dim=128 (a {TILE_M}-row block of "
                       f"folded rows must stay in one query head: len_q a multiple of {TILE_M})")
    return reasons


def _bias_reasons(inp: AttentionInputs) -> list[str]:
    from ..kernels import mask_tiles

    if inp.bias_kind == "bool":
        return ["a bool mask: Triton's kernels skip its fully masked tiles (mask tiles); CUTLASS reads additive biases"]
    if inp.bias.dtype != inp.dtype:
        return [f"a {str(inp.bias.dtype).replace('torch.', '')} bias with {str(inp.dtype).replace('torch.', '')} q "
                "(the CUTLASS kernels read the bias in q's dtype)"]
    if mask_tiles.mask_like(inp):
        return ["a mask-like bias (one for every head): Triton's kernels skip its fully masked tiles (mask tiles), "
                "CUTLASS would compute them"]
    return []


class CutlassBackend(KernelBackend):
    NAME = "cutlass"
    DEVICE_TYPES = ("cuda",)
    MIN_COMPUTE_CAPABILITY = (9, 0)
    SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
    # The exact instances are checked in extra_reasons, with the reason for each gap.
    SUPPORTED_HEAD_DIMS = (1, 256)
    SUPPORTED_BIAS_KINDS = ("none", "float", "bool")  # bool: refused in extra_reasons, in words
    SUPPORTS_DIFFERENT_V_DIM = False
    SUPPORTS_SOFTCAP = False
    HEAD_DIMS = (64, 128, 256)
    BACKWARD_KERNEL = "triton"  # where the CUTLASS backward does not take the input (backward_kernel)

    def device_reasons(self, device):
        reasons = super().device_reasons(device)
        if not reasons and device.type == "cuda" and torch.cuda.get_device_capability(device) != (9, 0):
            cc = torch.cuda.get_device_capability(device)
            reasons.append(f"compute capability {cc[0]}.{cc[1]}: the kernels are built for sm_90a (H100/H200) only")
        return reasons

    def unavailable_reasons(self, device):
        """The forward library of head dims 128 and 256 (`info`); dispatch checks an input's own
        library (`unavailable_reasons_for`)."""
        _, why = _library()
        return [f"the CUTLASS library is {why}"] if why else []

    def unavailable_reasons_for(self, inp: AttentionInputs) -> list[str]:
        # The input's own library (its head dim's, with or without dropout), asked for only once
        # the input is otherwise accepted: a build of minutes.
        _, why = _library(inp.dropout_p > 0, inp.head_dim)
        return [f"the CUTLASS {'dropout ' if inp.dropout_p > 0 else ''}library is {why}"] if why else []

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        # Off an sm_90 GPU nothing below matters; and the rewrite asks on traced values, where a
        # size test on a symbolic size would add a guard (a recompile per length, dynamic=True).
        if self.device_reasons(inp.device):
            return []
        if any(isinstance(x, torch.SymInt) for x in (*inp.q.shape, *inp.k.shape)):
            return ["symbolic sizes (dynamic shapes): CUTLASS's limits are checked per call, at run time"]
        reasons = []
        if inp.head_dim not in self.HEAD_DIMS:
            reasons.append(f"head_dim={inp.head_dim} (CUTLASS instances: {', '.join(map(str, self.HEAD_DIMS))})")
        scores = inp.batch * inp.heads_q * inp.len_q * inp.len_k
        if inp.head_dim == 64 and scores < D64_MIN_SCORES:
            reasons.append(f"head_dim=64 with B*H*Nq*Nk = {scores} < 2^{D64_MIN_SCORES.bit_length() - 1} scores: "
                           "Triton's kernels, launched from Inductor's graph under torch.compile, cost less host "
                           "time than the opaque CUTLASS op where the kernels are this short")
        grouped = inp.heads_q != inp.heads_kv
        causal = _effective_causal(inp)
        features = (("bottom-right causal", causal == Causal.BOTTOM_RIGHT), ("grouped KV heads", grouped),
                    ("bias", inp.bias is not None), ("dropout", inp.dropout_p > 0), ("head dim 64", inp.head_dim == 64))
        for feature, used in features:
            if used and feature in UNVALIDATED:
                reasons.append(f"{feature}: built, awaiting its first GPU test run (Triton runs it)")
        if causal == Causal.BOTTOM_RIGHT and inp.len_q > inp.len_k:
            reasons.append(f"bottom-right causal with len_q={inp.len_q} > len_k={inp.len_k} (rows with no key "
                           "are not in the CUTLASS kernels)")
        rows = block_rows(inp.head_dim, inp.bias is not None, inp.dropout_p > 0)
        if grouped and causal != Causal.NONE and (inp.len_q != inp.len_k or inp.len_q % rows):
            reasons.append(f"causal with grouped KV heads needs len_q = len_k, a multiple of {rows} "
                           f"(got {inp.len_q} and {inp.len_k})")
        if not (inp.scale > 0 and math.isfinite(inp.scale)):
            reasons.append(f"scale={inp.scale:g} (the CUTLASS softmax needs a finite scale > 0)")
        if inp.bias is not None:
            reasons += _bias_reasons(inp)
            if inp.head_dim in TMA_BIAS_HEAD_DIMS and not reasons:
                reasons += _tma_bias_reasons(inp)
        if inp.len_q % 8:
            reasons.append(f"len_q={inp.len_q} (the CUTLASS kernels need a multiple of 8)")
        if inp.len_k == 0:
            reasons.append("len_k=0")
        biggest = max(t.numel() for t in (inp.q, inp.k, inp.v))
        if biggest > _INT32_MAX or inp.batch * inp.heads_q * inp.len_q > _INT32_MAX:
            reasons.append("a tensor has more than 2^31 elements (the kernels index with 32 bits)")
        return reasons

    @staticmethod
    def _call(inp: AttentionInputs, seed: torch.Tensor | None = None):
        """(dtype code, mask code, the C params, out, lse, tensors the params point into). With
        dropout, `seed` is the op's seed tensor (two int64 words), read by the kernel."""
        from ..kernels import triton_attention

        b, hq, nq, d = inp.q.shape
        hkv, nk = inp.k.shape[1], inp.k.shape[2]
        groups = hq // hkv
        # Grouped KV heads: the G query heads of each KV head become G·Nq rows (a view when q is
        # contiguous in [B, H, N, D], a copy otherwise); out and lse are viewed back.
        q = inp.q.reshape(b, hkv, groups * nq, d) if groups > 1 else inp.q
        q, k, v = (_tma_ready(t) for t in (q, inp.k, inp.v))
        causal = _effective_causal(inp)
        mask = {Causal.NONE: NO_MASK, Causal.TOP_LEFT: FOLDED if groups > 1 else TOP_LEFT,
                Causal.BOTTOM_RIGHT: BOTTOM_RIGHT}[causal]
        rows = q.shape[2]
        out = torch.empty(b, hkv, rows, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, hkv, rows, dtype=torch.float32, device=q.device)
        bias, bias_strides = _bias_ready(inp) if inp.bias is not None else (None, (0, 0, 0))
        p = float(inp.dropout_p)
        if p > 0:
            if seed is None or seed.numel() < 2:
                raise ValueError("dropout needs the op's seed tensor (two int64 words)")
            seed = seed.to(device=q.device, dtype=torch.int64).contiguous()
        else:
            seed = None
        params = _Params(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            b, hkv, rows, nk, d, _strides(q), _strides(k), _strides(v), _strides(out),
            float(inp.scale), torch.cuda.get_device_properties(q.device).multi_processor_count,
            torch.cuda.current_stream(q.device).cuda_stream,
            bias.data_ptr() if bias is not None else None, (ctypes.c_int64 * 3)(*bias_strides),
            groups, nq,
            seed.data_ptr() if seed is not None else None, p, triton_attention.dropout_threshold(p) if p > 0 else 0,
        )
        return _DTYPE_CODES[q.dtype], mask, params, out, lse, (q, k, v, bias, seed)

    def bias_read(self, inp: AttentionInputs) -> str | None:
        """How the kernel will read this input's bias: "tma" (head dim 128: a tile per key block
        loaded into shared memory beside K and V), "softmax" (head dims 64 and 256: from global memory
        between the GEMMs), or None (no bias, or no instance takes the input)."""
        lib, why = _library(inp.dropout_p > 0, inp.head_dim)
        if lib is None:
            raise RuntimeError(f"the CUTLASS library is {why}")
        with torch.cuda.device(inp.q.device):
            seed = torch.zeros(2, dtype=torch.int64, device=inp.q.device) if inp.dropout_p > 0 else None
            dtype, mask, params, *_ = self._call(inp, seed)
            code = lib.flash_cutlass_bias_read(dtype, mask, ctypes.byref(params))
        return {1: "softmax", 2: "tma"}.get(code)

    def forward(self, inp: AttentionInputs, seed):
        lib, why = _library(inp.dropout_p > 0, inp.head_dim)
        if lib is None:
            raise RuntimeError(f"the CUTLASS library is {why}")
        b, hq, nq, d = inp.q.shape
        with torch.cuda.device(inp.q.device):
            dtype, mask, params, out, lse, _keep = self._call(inp, seed)
            err = ctypes.create_string_buffer(512)
            code = lib.flash_cutlass_fwd(dtype, mask, ctypes.byref(params), err, len(err))
        if code:
            raise RuntimeError(f"CUTLASS forward failed: {err.value.decode(errors='replace')}")
        return out.view(b, hq, nq, d), lse.view(b, hq, nq)

    def backward_reasons(self, inp: AttentionInputs, check_library: bool = True) -> list[str]:
        """Why the CUTLASS backward does not take an input this backend's forward took (then the
        Triton backward runs, from the same out and lse); [] when it does. `check_library=False`
        leaves out whether its library builds (the rewrite's report: inference never builds it)."""
        reasons = []
        if "backward" in UNVALIDATED:
            reasons.append("the CUTLASS backward: built, awaiting its first GPU test run")
        if inp.head_dim not in BWD_HEAD_DIMS:
            reasons.append(f"head_dim={inp.head_dim}: the CUTLASS backward is built for "
                           f"{', '.join(map(str, BWD_HEAD_DIMS))}")
        if inp.head_dim == 256 and "head dim 256 backward" in UNVALIDATED:
            reasons.append("head_dim=256: the CUTLASS backward's kernel (csrc/bwd_d256.cuh) is built, awaiting its "
                           "first GPU test run")
        if inp.dropout_p > 0 and "dropout backward" in UNVALIDATED:
            reasons.append("dropout: built into the CUTLASS backward, awaiting its first GPU test run")
        if inp.dropout_p > 0 and _dropout_threshold(inp.dropout_p) >= 1 << 16:
            reasons.append(f"dropout_p={inp.dropout_p}: the CUTLASS backward takes p < 1 - 2^-17 (its draw compares "
                           "16-bit halves against a threshold below 2^16)")
        if inp.bias is not None:
            if "bias backward" in UNVALIDATED:
                reasons.append("bias: built into the CUTLASS backward, awaiting its first GPU test run")
            if "bias backward" in SLOWER_THAN_TRITON:
                reasons.append(SLOWER_THAN_TRITON["bias backward"])
            b4 = inp.bias_4d()
            row_stride = max(b4.stride(2) if b4.shape[2] > 1 else 0, -(-inp.len_k // 8) * 8)
            # The bias gradient's [B, Hq, Nq, Nk] buffer is indexed the same way (row stride Nk).
            if (inp.len_q - 1) * max(row_stride, inp.len_k) + inp.len_k >= _INT32_MAX:
                reasons.append("a bias head of 2^31 elements or more (the backward indexes a head's bias with 32 bits)")
        if inp.len_q % 8:
            reasons.append(f"len_q={inp.len_q} (the CUTLASS backward needs a multiple of 8)")
        if inp.heads_q != inp.heads_kv and _effective_causal(inp) == Causal.TOP_LEFT and inp.len_k % BWD_TILE_KEYS:
            # The forward's block may be 192 rows (head dim 64): its limit does not imply this one.
            reasons.append(f"causal with grouped KV heads and len_k={inp.len_k} (the CUTLASS backward needs a "
                           f"multiple of {BWD_TILE_KEYS}, its key block, as the folded mask needs)")
        if inp.batch * inp.heads_q * inp.len_q * inp.len_k == 0:
            reasons.append("an empty input (Triton's backward returns its zeros)")
        if not reasons and check_library:
            _, why = _bwd_library(inp.dropout_p > 0, inp.head_dim)
            if why:
                reasons.append(f"the CUTLASS {'dropout ' if inp.dropout_p > 0 else ''}backward library is {why}")
        return reasons

    def backward_kernel(self, inp: AttentionInputs) -> str:
        return "triton" if self.backward_reasons(inp) else self.NAME

    def backward(self, inp, seed, out, lse, dout, dlse, bias_requires_grad):
        if self.backward_reasons(inp):
            # Triton's backward reads the same (out, lse): the forward's contract.
            return TritonBackend().backward(inp, seed, out, lse, dout, dlse, bias_requires_grad)
        from ..kernels import triton_attention

        p = float(inp.dropout_p)
        lib, _ = _bwd_library(p > 0, inp.head_dim)
        if p > 0:
            if seed is None or seed.numel() < 2:
                raise ValueError("dropout needs the forward's seed tensor (two int64 words)")
            seed = seed.to(device=inp.q.device, dtype=torch.int64).contiguous()
        b, hq, nq, d = inp.q.shape
        hkv, nk = inp.k.shape[1], inp.k.shape[2]
        groups = hq // hkv
        rows = groups * nq
        # Grouped KV heads folded into rows as in the forward: each KV head's dK/dV then sums
        # over its query heads inside the kernel.
        fold = (lambda t: t.reshape(b, hkv, rows, d)) if groups > 1 else (lambda t: t)
        q, k, v, do = (_tma_ready(t) for t in (fold(inp.q), inp.k, inp.v, fold(dout)))
        with torch.cuda.device(q.device):
            delta = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
            dq_acc = torch.empty(b, hq, nq, d, dtype=torch.float32, device=q.device)
            lse_log2 = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
            triton_attention.preprocess(_unit_last(out), _unit_last(dout), dlse, delta, dq_acc, d,
                                        lse=lse.contiguous(), lse_log2=lse_log2, keep_scale=1.0 / (1.0 - p))
            causal = _effective_causal(inp)
            mask = {Causal.NONE: NO_MASK, Causal.TOP_LEFT: FOLDED if groups > 1 else TOP_LEFT,
                    Causal.BOTTOM_RIGHT: BOTTOM_RIGHT}[causal]
            # Top-left causal with more keys than rows: no row sees a key past len_q, so their
            # dK/dV are zeros and the kernel runs on the first len_q keys (a key block that no
            # query block reaches would stall its pipelines; the kernel refuses one).
            kernel_nk = min(nk, nq) if mask == TOP_LEFT else nk
            # dK and dV in k's and v's layout (the epilogue's TMA store takes any 16-byte
            # strides), so HF's [B, N, H, D] inputs get theirs without the op's copy.
            dk, dv = empty_in_layout(inp.k), empty_in_layout(inp.v)
            if kernel_nk < nk:
                dk.zero_()
                dv.zero_()
            bias, bias_strides = _bias_ready(inp) if inp.bias is not None else (None, (0, 0, 0))
            ds = None
            if bias_requires_grad:
                # dS per score, as Triton's backward writes it (inputs.bias_grad_from_scores reduces
                # it), zeros included; rows padded to 16 bytes for the kernel's coalesced stores.
                ds = torch.empty(b, hq, nq, -(-nk // 8) * 8, dtype=inp.bias.dtype, device=q.device)[..., :nk]
                if kernel_nk < nk:
                    ds[..., kernel_nk:].zero_()  # the keys trimmed above
            params = _BwdParams(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), do.data_ptr(), lse_log2.data_ptr(), delta.data_ptr(),
                dq_acc.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                b, hkv, rows, kernel_nk, d, _strides(q), _strides(k), _strides(v), _strides(do), _strides(dk),
                _strides(dv), float(inp.scale), torch.cuda.get_device_properties(q.device).multi_processor_count,
                torch.cuda.current_stream(q.device).cuda_stream,
                bias.data_ptr() if bias is not None else None, (ctypes.c_int64 * 3)(*bias_strides), groups, nq,
                ds.data_ptr() if ds is not None else None, _strides(ds) if ds is not None else (ctypes.c_int64 * 3)(),
                seed.data_ptr() if p > 0 else None, p, triton_attention.dropout_threshold(p) if p > 0 else 0,
            )
            err = ctypes.create_string_buffer(512)
            code = lib.flash_cutlass_bwd(_DTYPE_CODES[q.dtype], mask, ctypes.byref(params), err, len(err))
        if code:
            raise RuntimeError(f"CUTLASS backward failed: {err.value.decode(errors='replace')}")
        # The cast from the float32 accumulator writes dQ in q's layout in the same pass.
        dbias = inp.bias_grad_from_scores(ds) if ds is not None else None
        return empty_in_layout(inp.q).copy_(dq_acc), dk, dv, dbias
