"""FlashAttention-2 in Triton: forward, backward (dK/dV and dQ kernels), launch glue.

Reads top to bottom like Triton's 06-fused-attention tutorial: the score/mask and dropout
helpers, the forward inner loop and kernel, the backward kernels, then `forward` / `backward`
(the functions `flash_inductor.backends.triton` calls).

Semantics are `flash_inductor.reference`'s, exactly:

* s = scale·q·kᵀ + bias (float bias, converted to float32) or masked to -inf where a bool
  keep-mask is False, where a float bias is <= MASKED_BIAS, where causal hides the key, or
  past the sequence ends.
* A row with no visible key returns zeros and lse = -inf; the running max is guarded
  (0 where it is -inf) so no NaN is ever formed, and the backward treats p = 0 there.
* Dropout: the normaliser l sums the undropped probabilities; only P·V (and dP, dV in the
  backward) see the dropped ones, scaled by 1/(1-p).

Scores are kept in the base-2 domain (multiplied by log2(e)) so the inner loop uses exp2, as
the tutorial does; lse is converted back to natural log on the way out.

Every tensor is read through its strides (size-1 bias dims with stride 0, never expanded); only
the last dim is assumed unit-stride, and a q/k/v/out/dout/bias whose last dim is not gets a copy
(of the bias, only its unbroadcast part).
GQA: query head h reads KV head h // (Hq // Hkv); the dK/dV kernel loops over the group's query
heads, so K/V are never repeated and the backward needs no atomics (deterministic), except
that with dropout dQ is added by the dK/dV kernel with atomics (`fused_dq`).

Limits: offsets inside one (batch, head) slice are int32 except the bias/dS rows (int64), so
one head of q/k/v must span < 2**31 elements; sequence lengths must be < 2**31.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import os

import torch
import triton
import triton.language as tl

from ..inputs import MASKED_BIAS as _MASKED_BIAS
from ..inputs import AttentionInputs, Causal, empty_in_layout
from ..inputs import unit_last_dim as _unit_last
from . import mask_tiles

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
CAUSAL_NONE = tl.constexpr(int(Causal.NONE))
CAUSAL_BOTTOM_RIGHT = tl.constexpr(int(Causal.BOTTOM_RIGHT))
# Dropout compares 16-bit draws with p·2**16 (integer-only, the same on every Triton
# version); one Philox call gives 8 draws, for keys spread over a DROP_SPAN of 32 so that
# they sit in one thread's accumulator registers (`_dropout_keep`).
DROPOUT_BITS = tl.constexpr(16)
MASKED_BIAS = tl.constexpr(_MASKED_BIAS)
# Half of MASKED_BIAS·log2(e): a forward row whose base-2 max (a backward row whose lse) is above
# it has a key whose bias is above about -5e29 (while |scale·q·kᵀ| stays below 1e29), so an entry
# <= MASKED_BIAS adds exp2(<= -5.8e29) = 0 to it, as -inf would (docs/design.md §19).
REDO_BELOW = tl.constexpr(_MASKED_BIAS * LOG2E.value / 2)
DROP_SPAN = tl.constexpr(32)
# How a q·kᵀ tile becomes base-2 scores (the SCORES constexpr). FOLDED: the scale is positive,
# so the forward takes a row's max over q·kᵀ itself and the scale joins exp2's argument in one
# FMA (FlashAttention's order): one multiply per score fewer than SCALED, which multiplies first
# (any sign of the scale; 0 · -inf or -c · -inf would break a hidden key). CAPPED: logit
# soft-capping. Measured (session 13, H200, N=4096/8192 D=128, device time, one call): forward
# +2-4% without a mask and causal; the same fold in both backward kernels came out 1% slower
# at 8192 (LLVM already fuses the multiply into the subtraction of lse there, where no select
# sits between them), so the backward runs FOLDED as SCALED. So does a forward with a bias: its
# row max, and the select that masks entries <= MASKED_BIAS, need the biased scores. The FMA
# is LLVM's contraction, on by default up to Triton 3.9 (3.10 turns it off by default).
SCORES_SCALED = tl.constexpr(0)
SCORES_FOLDED = tl.constexpr(1)
SCORES_CAPPED = tl.constexpr(2)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# =============================================================================================
# Shared pieces: masked scores, dropout keep-mask
# =============================================================================================


@triton.jit
def _masked_scores(
    s, qi, kj, b, Nk, shift,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, MASK_KEYS: tl.constexpr,
    MASK_CAUSAL: tl.constexpr, SELECT_MASKED: tl.constexpr,
):
    """Add the bias tile `b` to the base-2 scores `s` and set hidden entries to -inf.

    `qi` (query index) and `kj` (key index) broadcast to s's shape: [M, 1] and [1, N] in the
    forward and dQ kernels, [1, M] and [N, 1] in the dK/dV kernel, which works on sᵀ.
    MASK_KEYS hides keys >= Nk (only the last key block has them); MASK_CAUSAL the keys past
    the diagonal. Blocks that need neither skip the per-element select entirely: that select
    is a third of the elementwise work in the inner loop. Query rows >= Nq are never masked:
    their q rows load as 0 and they are never stored (dK/dV sees them with lse = -inf, p = 0).
    """
    if HAS_BIAS:
        if BIAS_IS_BOOL:
            keep = b != 0
            if MASK_KEYS:
                keep = keep & (kj < Nk)
            if MASK_CAUSAL:
                keep = keep & (kj <= qi + shift)
            s = tl.where(keep, s, float("-inf"))
        else:
            # <= MASKED_BIAS masks the key (inputs.py); finfo.min * log2(e) would round to
            # -inf anyway, but -1e30 would not. Without SELECT_MASKED such an entry stays a
            # number <= -1.44e30: the forward's fast pass (`_attn_fwd_rows`) and the backward
            # (`_backward_lse2`). The FMA is written out: as `s + bf * LOG2E` the dK/dV kernel
            # converted the float32 product to the MMA layout instead of the bf16 tile (twice
            # the shared-memory traffic; TTGIR, sm_90).
            bf = b.to(tl.float32)
            if SELECT_MASKED:
                s = tl.where(bf <= MASKED_BIAS, float("-inf"), tl.fma(bf, LOG2E, s))
            else:
                s = tl.fma(bf, LOG2E, s)
            s = _hide_keys(s, qi, kj, Nk, shift, MASK_KEYS, MASK_CAUSAL)
    else:
        s = _hide_keys(s, qi, kj, Nk, shift, MASK_KEYS, MASK_CAUSAL)
    return s


@triton.jit
def _backward_lse2(lse):
    """The backward's base-2 lse: +inf (p = 0) for a row with no visible key, and for a row whose
    lse is at or below REDO_BELOW (every visible score near -1e30). Float32 cannot hold such an
    lse to within log2(Nk) (its ulp there is 7e22), so exp2(s - lse) could give a row no
    meaningful gradient whatever the kernel did; it gets none. Every other row's bias entries
    <= MASKED_BIAS give exp2(<= -5.8e29) = 0 without the per-score select, as -inf would: so
    the backward never selects (docs/design.md §19). One compare covers both kinds of row
    (-inf is below REDO_BELOW): this runs for every query row of every dK/dV step."""
    lse2 = lse * LOG2E
    return tl.where(lse2 <= REDO_BELOW, float("inf"), lse2)


@triton.jit
def _load_bias(ptrs, ok, HAS_BIAS: tl.constexpr):
    """One bias tile (masked loads read 0), or a placeholder without a bias.

    Loaded in the iteration that uses it, after the K tile's load is issued. Carrying it
    one iteration ahead in registers (a hand-made pipeline stage, since Triton pipelines only
    the loads that feed dots) was measured slower on H100: 312 vs 371 TFLOP/s forward at
    N=8192 (register pressure); see benchmarks/NOTES.md."""
    if HAS_BIAS:
        b = tl.load(ptrs, mask=ok, other=0)
    else:
        b = tl.zeros([1, 1], dtype=tl.int8)
    return b


@triton.jit
def _tanh(x):
    """tanh in float32 from exp2 alone (libdevice's tanh does not run under the interpreter,
    and the CPU tests must check the arithmetic the GPU runs). (1 - e) / (1 + e) with
    e = exp(-2|x|) loses relative accuracy near 0 by cancellation, so |x| < 1/8 takes the
    series to x⁷ instead (truncation below 4e-9 relative there; the exp2 form's error above
    it is under 1e-6 relative)."""
    ax = tl.abs(x)
    e = tl.math.exp2(ax * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    return tl.where(ax < 0.125, small, tl.where(x < 0, -big, big))


@triton.jit
def _scaled_scores(qk, qk_scale, cap_scale, SCORES: tl.constexpr):
    """(base-2 scores, t) of a q·kᵀ tile. Without soft-capping s = qk_scale·qk (qk_scale =
    scale·log2 e) and t is unused; with it (qk_scale = scale / c, cap_scale = c·log2 e)
    t = tanh(scale·qk / c) and s = c·t in base 2: the backward needs t for d(c·t)/d(scale·qk)
    = 1 - t²."""
    if SCORES == SCORES_CAPPED:
        t = _tanh(qk * qk_scale)
        s = t * cap_scale
    else:
        s = qk * qk_scale
        t = s
    return s, t


@triton.jit
def _hide_keys(s, qi, kj, Nk, shift, MASK_KEYS: tl.constexpr, MASK_CAUSAL: tl.constexpr):
    if MASK_KEYS or MASK_CAUSAL:
        keep = kj < Nk
        if MASK_CAUSAL:
            keep = keep & (kj <= qi + shift)
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _keep_halves(word, drop_threshold):
    """The keep bits of a 32-bit Philox word's two 16-bit draws, stacked on a new last dim."""
    word = word.to(tl.uint32, bitcast=True)
    lo = ((word & 0xFFFF).to(tl.int32) >= drop_threshold).to(tl.int8)
    hi = ((word >> 16).to(tl.int32) >= drop_threshold).to(tl.int8)
    return tl.join(lo, hi)


@triton.jit
def _dropout_keep(
    philox_seed, philox_offset, bh, offs_q, start_k, drop_threshold,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, KEYS_FIRST: tl.constexpr,
):
    """Bernoulli(1-p) keep-mask of the tile (queries offs_q) × (keys start_k + [0, BLOCK_K)).

    A pure function of (seed, offset, b·Hq+h, i, j), whatever the tiling: one Philox call per
    query row and group of 8 keys, its four 32-bit words cut into eight 16-bit draws, each
    compared with p·2**16. Eight draws per call instead of one is what makes dropout cheap; 16
    bits quantise p by at most 2**-17. The counter words are (key group, query row, b·Hq+h,
    offset), so nothing overflows for any size.

    Which 8 keys share a call follows the tensor-core accumulator layout (Hopper's wgmma and
    Ampere's mma both give a thread the column pairs 2c..2c+1 of every 8-column chunk): key
    j = 32a + 8w + 2c + e takes half e of word w of the call for group 4a + c. A thread then
    computes the calls for its own scores and nothing moves between threads; the earlier
    mapping (8 adjacent keys per call) put five shared-memory layout conversions per tile into
    the forward, and cost it as much as the Philox arithmetic (docs/design.md §4). KEYS_FIRST
    returns the transposed tile ([keys, queries]) that the dK/dV kernel works on; there the
    keys run across threads, so its layout conversion stays.
    """
    tl.static_assert((BLOCK_K // DROP_SPAN) * DROP_SPAN == BLOCK_K)
    spans = start_k // DROP_SPAN + tl.arange(0, BLOCK_K // DROP_SPAN)
    pair = tl.arange(0, 4)
    groups = spans[None, :, None] * 4 + pair[None, None, :]
    rows = offs_q[:, None, None]
    zero = groups * 0 + rows * 0
    r0, r1, r2, r3 = tl.philox(philox_seed, groups + zero, rows + zero, bh + zero, philox_offset + zero)
    # Compared before they are arranged: whatever has to move (KEYS_FIRST) moves as bytes.
    k0 = _keep_halves(r0, drop_threshold)
    k1 = _keep_halves(r1, drop_threshold)
    k2 = _keep_halves(r2, drop_threshold)
    k3 = _keep_halves(r3, drop_threshold)
    # [q, a, c, e, w % 2, w // 2] -> [q, a, w // 2, w % 2, c, e] -> [q, 32a + 8w + 2c + e]
    keep = tl.join(tl.join(k0, k1), tl.join(k2, k3))
    keep = tl.reshape(tl.permute(keep, (0, 1, 5, 4, 2, 3)), [BLOCK_Q, BLOCK_K])
    if KEYS_FIRST:
        keep = tl.trans(keep)
    return keep != 0


@triton.jit
def _load_philox(Seed):
    """seed[0] keys Philox; seed[1] (folded to 32 bits) is the fourth counter word."""
    philox_seed = tl.load(Seed)
    off = tl.load(Seed + 1)
    philox_offset = (off ^ (off >> 32)).to(tl.int32)
    return philox_seed, philox_offset


@triton.jit
def _causal_shift(Nq, Nk, CAUSAL: tl.constexpr):
    """Query i sees key j iff j <= i + shift."""
    if CAUSAL == CAUSAL_BOTTOM_RIGHT:
        shift = Nk - Nq
    else:
        shift = Nk * 0
    return shift


@triton.jit
def _row_block(CAUSAL: tl.constexpr):
    """This program's query block (forward and dQ grids). Under causal a block's work grows with
    its index and the GPU starts programs in grid order, so each head's blocks are taken longest
    first (as FlashAttention 2 does): the programs that start last, the tail of the last wave,
    are then the shortest, not the longest of the last head."""
    pid = tl.program_id(0)
    if CAUSAL != CAUSAL_NONE:
        pid = tl.num_programs(0) - 1 - pid
    return pid


@triton.jit
def _key_ranges(start_m, Nk, shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(hi, mid) for the query block at start_m (forward and dQ): keys [0, mid) need no
    element mask (every row of the block sees them and they are whole blocks inside Nk);
    [mid, hi) is the diagonal band and the ragged last block; keys from hi on are hidden
    from every row of the block (causal) and skipped."""
    if CAUSAL != CAUSAL_NONE:
        hi = tl.minimum(start_m + BLOCK_M + shift, Nk)
        mid = tl.minimum(tl.maximum(start_m + shift + 1, 0) // BLOCK_N * BLOCK_N, hi)
    else:
        hi = Nk
        mid = Nk
    return hi, tl.minimum(mid, Nk // BLOCK_N * BLOCK_N)


@triton.jit
def _sequence(Cu, b, N, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: from the cumulative offsets with VARLEN, else (0, N)."""
    if VARLEN:
        start = tl.load(Cu + b).to(tl.int64)
        n = (tl.load(Cu + b + 1) - start).to(tl.int32)
    else:
        start = 0
        n = N
    return start, n


@triton.jit
def _listed_block(it, tiles, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """First index of the it-th block of the listed tiles (TILE // BLOCK blocks per tile)."""
    return tl.load(tiles + it // (TILE // BLOCK)) * TILE + (it % (TILE // BLOCK)) * BLOCK


@triton.jit
def _listed_range(lo, hi, tiles, TILE: tl.constexpr):
    """(listed tiles to loop over, dense range [lo, hi)) for an inner loop. Without a list the
    range is the caller's. With one (`hi` tiles at `tiles`) whose tiles are consecutive (a
    padding mask's real keys, the full tiles left of a causal row's diagonal: the usual case),
    the dense range covers them and nothing is listed: a listed block's address hangs on a
    load, which the pipeliner does not hide (the forward of a padded batch ran at 75% of the
    dense kernel's rate per score, H100, benchmarks/padding_profile.py); otherwise every tile
    is listed and the range is empty. Same blocks in the same order either way."""
    first = tl.load(tiles)
    run = (hi > 0) & (tl.load(tiles + tl.maximum(hi - 1, 0)) - first == hi - 1)
    return tl.where(run, 0, hi), tl.where(run, first * TILE, 0), tl.where(run, (first + hi) * TILE, 0)


@triton.jit
def _tile_lists(Counts, Tiles, b, h, row, stride_tb, stride_th, list_stride, row_len):
    """(partial count, partial tiles, full count, full tiles) of one map row."""
    r = b * stride_tb + h * stride_th + row
    n_partial = tl.load(Counts + r)
    n_full = tl.load(Counts + list_stride + r)
    return n_partial, Tiles + r * row_len, n_full, Tiles + (list_stride + r) * row_len


# =============================================================================================
# Forward
# =============================================================================================


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    K_head, V_head, bias_rows, philox_seed, philox_offset, bh,
    offs_m, offs_d, offs_dv, lo, hi, tiles,
    stride_kn, stride_vn, stride_bn,
    Nq, Nk, shift, qk_scale, cap_scale, drop_threshold,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASK_KEYS: tl.constexpr, MASK_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCORES: tl.constexpr, SPARSE: tl.constexpr, TILE: tl.constexpr, SELECT_MASKED: tl.constexpr,
):
    """Key blocks [lo, hi); with SPARSE, the blocks of the `hi` key tiles listed at `tiles`
    (flash_inductor/kernels/mask_tiles.py), as a range when they are consecutive
    (`_listed_range`). Both loops run the same step."""
    if SPARSE:
        n_listed, lo, hi = _listed_range(lo, hi, tiles, TILE)
        for it in range(0, n_listed * (TILE // BLOCK_N)):
            start_n = _listed_block(it, tiles, TILE, BLOCK_N)
            acc, l_i, m_i = _attn_fwd_step(
                acc, l_i, m_i, q, start_n, K_head, V_head, bias_rows, philox_seed, philox_offset, bh,
                offs_m, offs_d, offs_dv, stride_kn, stride_vn, stride_bn, Nq, Nk, shift, qk_scale,
                cap_scale, drop_threshold, D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT,
                MASK_KEYS, MASK_CAUSAL, DOT_PRECISION, SCORES, SELECT_MASKED,
            )
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_step(
            acc, l_i, m_i, q, start_n, K_head, V_head, bias_rows, philox_seed, philox_offset, bh,
            offs_m, offs_d, offs_dv, stride_kn, stride_vn, stride_bn, Nq, Nk, shift, qk_scale,
            cap_scale, drop_threshold, D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT,
            MASK_KEYS, MASK_CAUSAL, DOT_PRECISION, SCORES, SELECT_MASKED,
        )
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_step(
    acc, l_i, m_i, q, start_n,
    K_head, V_head, bias_rows, philox_seed, philox_offset, bh,
    offs_m, offs_d, offs_dv,
    stride_kn, stride_vn, stride_bn,
    Nq, Nk, shift, qk_scale, cap_scale, drop_threshold,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASK_KEYS: tl.constexpr, MASK_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCORES: tl.constexpr, SELECT_MASKED: tl.constexpr,
):
    m_ok = offs_m[:, None] < Nq
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # Key blocks without MASK_KEYS lie whole inside Nk (`_key_ranges`, full mask tiles): their
    # loads need no key bound, only the last block's do.
    n_ok = (offs_n < Nk) | (not MASK_KEYS)
    kT = tl.load(
        K_head + offs_n[None, :] * stride_kn + offs_d[:, None],
        mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0,
    )
    b = _load_bias(bias_rows + offs_n[None, :] * stride_bn, m_ok & n_ok[None, :], HAS_BIAS)
    qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
    if SCORES == SCORES_FOLDED and not HAS_BIAS:
        s = _hide_keys(qk, offs_m[:, None], offs_n[None, :], Nk, shift, MASK_KEYS, MASK_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        s, _t = _scaled_scores(qk, qk_scale, cap_scale, SCORES)
        s = _masked_scores(
            s, offs_m[:, None], offs_n[None, :], b, Nk, shift,
            HAS_BIAS, BIAS_IS_BOOL, MASK_KEYS, MASK_CAUSAL, SELECT_MASKED,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only -inf so far keeps m = -inf; subtracting 0 instead keeps
    # exp2(-inf - m) = 0 rather than NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if SCORES == SCORES_FOLDED and not HAS_BIAS:
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    else:
        p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _dropout_keep(
            philox_seed, philox_offset, bh, offs_m, start_n, drop_threshold,
            BLOCK_M, BLOCK_N, False,
        )
        p = tl.where(keep, p, 0.0)
    v = tl.load(
        V_head + offs_n[:, None] * stride_vn + offs_dv[None, :],
        mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_rows(
    q_rows, K_head, V_head, bias_rows, philox_seed, philox_offset, bh, offs_m, offs_d, offs_dv,
    Counts, Tiles, b, h, start_m, stride_kn, stride_vn, stride_bn, stride_tb, stride_th,
    list_stride, row_len, Nq, Nk, shift, qk_scale, cap_scale, drop_threshold,
    CAUSAL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, SCORES: tl.constexpr,
    SPARSE: tl.constexpr, TILE: tl.constexpr, SELECT_MASKED: tl.constexpr,
):
    """(acc, l, m) of one query block over every key block it sees. q is loaded here, so that
    nothing of a first pass stays live into a second (`_attn_fwd`)."""
    q = tl.load(q_rows + offs_d[None, :], mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if SPARSE:
        # Partial key tiles (bias and element masks), then full ones (neither).
        n_partial, partial, n_full, full = _tile_lists(
            Counts, Tiles, b, h, start_m // TILE, stride_tb, stride_th, list_stride, row_len
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_head, V_head, bias_rows, philox_seed, philox_offset, bh,
            offs_m, offs_d, offs_dv, 0, n_partial, partial, stride_kn, stride_vn, stride_bn,
            Nq, Nk, shift, qk_scale, cap_scale, drop_threshold,
            D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, True,
            CAUSAL != CAUSAL_NONE, DOT_PRECISION, SCORES, True, TILE, SELECT_MASKED,
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_head, V_head, bias_rows, philox_seed, philox_offset, bh,
            offs_m, offs_d, offs_dv, 0, n_full, full, stride_kn, stride_vn, stride_bn,
            Nq, Nk, shift, qk_scale, cap_scale, drop_threshold,
            D, DV, BLOCK_M, BLOCK_N, False, False, HAS_DROPOUT, False, False, DOT_PRECISION, SCORES, True, TILE, True,
        )
    else:
        hi, mid = _key_ranges(start_m, Nk, shift, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_head, V_head, bias_rows, philox_seed, philox_offset, bh,
            offs_m, offs_d, offs_dv, 0, mid, Tiles, stride_kn, stride_vn, stride_bn,
            Nq, Nk, shift, qk_scale, cap_scale, drop_threshold,
            D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, False, False, DOT_PRECISION,
            SCORES, False, TILE, SELECT_MASKED,
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_head, V_head, bias_rows, philox_seed, philox_offset, bh,
            offs_m, offs_d, offs_dv, mid, hi, Tiles, stride_kn, stride_vn, stride_bn,
            Nq, Nk, shift, qk_scale, cap_scale, drop_threshold,
            D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, True,
            CAUSAL != CAUSAL_NONE, DOT_PRECISION, SCORES, False, TILE, SELECT_MASKED,
        )

    return acc, l_i, m_i


def _config_list(default, block_m, block_n, warps_for, stages):
    """Autotune candidates, `default` first: it is what runs when autotuning is switched off."""
    rest = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in block_m
        for n in block_n
        for w in warps_for(m, n)
        for s in stages
        if (m, n, w, s) != default
    ]
    m, n, w, s = default
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)] + rest


def _wide(tiles, stages=(2, 3)):
    """8-warp candidates for head dims above 128 only (`_prune` drops them below): with 4 warps
    the two [BLOCK, 256] float32 accumulators of the dK/dV kernel (one of the forward and dQ) do
    not fit the registers of a thread, and every candidate of the D <= 128 lists spills (SASS
    from benchmarks/ttgir_probe.py --head-dim 256: dK/dV 32×64 with 4 warps, 579 spill stores;
    with 8 warps 101; 64×32 with 8 warps, 4). Which of them is fastest is the autotuner's call."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=8, num_stages=st) for m, n in tiles for st in stages]


# Under the interpreter one small config, unequal blocks so the causal block skipping is
# exercised with BLOCK_M != BLOCK_N; every key block is at least the dropout's DROP_SPAN.
if _interpreting():
    _FWD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    _DKDV_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    _DQ_CONFIGS = _FWD_CONFIGS
else:
    # The first config of each list, what runs with autotuning off for head dims above 64
    # (`_head_dim_default` below has the exceptions), is the one the autotuner picked most often on
    # H100 at N=4096/8192, D=128 (benchmarks/results/*s3*.json).
    _FWD_CONFIGS = _config_list(
        (128, 64, 8, 3), (64, 128), (32, 64, 128), lambda m, n: (8,) if m == 128 else (4,), (2, 3)
    )
    # dK/dV: BLOCK_N keys stay on chip, BLOCK_M query rows stream past them.
    _DKDV_CONFIGS = _config_list(
        (64, 128, 8, 3), (32, 64), (64, 128), lambda m, n: (8,) if n == 128 and m == 64 else (4,), (2, 3)
    )
    _DQ_CONFIGS = _config_list(
        (128, 64, 8, 3), (64, 128), (32, 64), lambda m, n: (8,) if m == 128 else (4,), (2, 3)
    )


def _add_wide(configs: list, tiles) -> set[int]:
    """Append the `_wide` candidates `configs` lacks; return their ids (for `_prune`)."""
    have = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}
    added = [c for c in _wide(tiles) if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) not in have]
    configs.extend(added)
    return {id(c) for c in added}


_LARGE_HEAD_ONLY = set() if _interpreting() else (
    _add_wide(_FWD_CONFIGS, [(64, 32), (128, 32), (64, 64)])
    | _add_wide(_DKDV_CONFIGS, [(64, 32), (32, 32), (32, 64), (16, 64)])
    | _add_wide(_DQ_CONFIGS, [(64, 32), (32, 32), (32, 64), (128, 32)])
)

# Whether a launch benchmarks its candidate configs or runs the first that fits (the default for
# its arguments: `_head_dim_default`). FLASH_INDUCTOR_TRITON_AUTOTUNE=1 or 0 decides wherever it
# is set. Unset, the eager op tunes (once per argument bucket, the choice cached across processes
# where Triton offers `cache_results`), and kernels compiled into an Inductor graph
# (kernels_in_graph.py) tune only under Inductor's `max_autotune`, i.e. torch.compile(...,
# mode="max-autotune"), as Inductor's own templates do. Tuning there compiles and times every
# candidate of every kernel variant a model launches: a cold compile of BERT-base (forward,
# then training step) with backend="flash" had not finished after 150 s, where
# backend="inductor" took 79 s (H100 host, benchmarks/compile_time.py, session 11).
AUTOTUNE_ENV = "FLASH_INDUCTOR_TRITON_AUTOTUNE"
_tuning_in_graph: contextvars.ContextVar[bool | None] = contextvars.ContextVar("tuning_in_graph", default=None)


def autotuning() -> bool:
    setting = os.environ.get(AUTOTUNE_ENV, "").strip()
    if setting:
        return setting != "0"
    in_graph = _tuning_in_graph.get()
    return True if in_graph is None else in_graph


@contextlib.contextmanager
def tuning_in_graph(enabled: bool):
    """Launches traced inside this context (into an Inductor graph) tune iff `enabled`, unless
    the environment decides."""
    token = _tuning_in_graph.set(enabled)
    try:
        yield
    finally:
        _tuning_in_graph.reset(token)

# With dropout, the backward runs as one kernel: the dK/dV kernel, which already has each score's
# probability and keep bits, also adds dS·K into a float32 dQ accumulator with atomics, and the dQ
# kernel (which recomputed all of it and drew every keep bit again) is not launched. Measured on
# an H100 (session 12, N=8192 D=128 bf16, one call): dropout backward 244 → 284 TFLOP/s, causal +
# dropout 200 → 226, and BERT-base's attention backward 1867 → 1457 µs a step; without dropout
# the atomics cost more than the recompute saves (session 11, one call: 430 → 402, causal 353 →
# 333), so it stays off. Atomics make dQ's
# float32 sums order-dependent: off under torch.use_deterministic_algorithms, and
# FLASH_INDUCTOR_FUSED_DQ=0 / 1 forces it off / on (a bias that requires grad needs the dQ
# kernel's dS, so it never fuses).
FUSED_DQ_ENV = "FLASH_INDUCTOR_FUSED_DQ"


def fused_dq(inp: AttentionInputs, bias_requires_grad: bool) -> bool:
    if bias_requires_grad or torch.are_deterministic_algorithms_enabled():
        return False
    setting = os.environ.get(FUSED_DQ_ENV, "").strip()
    if setting:
        return setting != "0"
    return inp.dropout_p > 0.0


# Shared memory per SM on H100 is 228 KiB; configs whose tiles clearly cannot fit are dropped
# before compiling (the autotuner would skip them anyway, after paying for the compile).
_SMEM_BUDGET = 200 * 1024


# Head dims up to 64 (every model of the e2e table) get 64 × 64 tiles, 4 warps, 3 stages in all
# three kernels when autotuning is off. On the shapes benchmarks/config_sweep.py timed (H100,
# session 8: BERT, T5, GPT-2, BLOOM and LLaMA sizes, N = 512..8192, with dropout, bias and causal)
# it is the forward's best or within 2% of it (up to 24% ahead of the D = 128 default), and in the
# backward ahead of the D = 128 defaults but on BERT's dQ (0.4% behind), though up to 11% behind
# the best candidate of some shapes (2 stages for BERT's dK/dV). Not for the forward and dQ of non-causal N >= 8192, where
# 128 × 64 with 8 warps stays ahead.
_SMALL_HEAD_DEFAULT = (64, 64, 4, 3)


# Head dims above 128 (Gemma 2's 256, and 160 or 192, which pad to 256): the dK/dV kernel with 8
# warps, 32 queries streaming past 64 keys. On Gemma 2 2B's attention (B=2, H=8, N=2048, causal,
# padding mask; H100, benchmarks/config_sweep.py, session 9) the whole backward takes 630 µs with
# it, against 1239 with the first fitting 4-warp config and 873 with the best 4-warp one (those
# spill their [64, 256] float32 accumulators: `_wide`). The forward: 128 × 64 with 8 warps and 2
# stages, 122 µs against 146 for the first fitting config (64 × 32, 4 warps, 2 stages), which dQ
# keeps (within 2% of its best).
_LARGE_HEAD_DEFAULTS = {"dkdv": (32, 64, 8, 3), "fwd": (128, 64, 8, 2)}


# Head dims 65..128 with a bias, up to N = 4096: the dK/dV kernel with 32 queries streaming past
# 64 keys, 4 warps, 2 stages. config_sweep.py (session 9, H200, bias + causal, D=128) timed the
# backward at 233 against 273 µs (N=2048) and 665 against 744 (N=4096) with the D=128 default;
# the autotuner picked it too. Without a bias the default stays within 3% of the best there.
# On an H100 (session 12, device time) the bias + causal backward went 118 → 137 TFLOP/s (2048)
# and 173 → 192 (4096). A float bias with a causal mask takes it at every length: at 8192 the
# autotuner picks it (session 14, H200, backward without the bias select: dK/dV 1207 µs against
# 1870 for the 8-warp default, whose two causal loops spill); without one the 8-warp default stays
# ahead at 8192 (the autotuner keeps it: 2275 µs). Boolean masks were not timed there.
_BIAS_DKDV_DEFAULT = (32, 64, 4, 2)


def _head_dim_default(kernel: str, args: dict) -> tuple[int, int, int, int] | None:
    if max(args["BLOCK_D"], args["BLOCK_DV"]) > 128:
        return _LARGE_HEAD_DEFAULTS.get(kernel)
    if max(args["BLOCK_D"], args["BLOCK_DV"]) > 64:
        float_bias_causal = args.get("HAS_BIAS") and not args.get("BIAS_IS_BOOL") and args["CAUSAL"]
        if kernel == "dkdv" and args.get("HAS_BIAS") and (float_bias_causal or args["N_BUCKET"] <= 4096):
            return _BIAS_DKDV_DEFAULT
        return None
    if kernel != "dkdv" and args["N_BUCKET"] >= 8192 and not args["CAUSAL"]:
        return None
    if kernel == "dkdv" and args.get("FUSED_DQ") and args.get("HAS_BIAS") and not args["CAUSAL"]:
        # BERT's training backward (padding bias, dropout): with 3 stages the fused loop spills
        # (11 STL + 11 LDL per key block, ttgir_probe at D=64); with 2 it does not. H200, device
        # time, B·H = 96, three rounds: dK/dV 107-108 → 105 µs at N=512, 386-390 → 381-384 at 1024.
        return _SMALL_HEAD_DEFAULT[:3] + (2,)
    return _SMALL_HEAD_DEFAULT


def _prune(streamed_block: str, resident_block: str, kernel: str):
    """Prune by head dim: the resident tile plus `num_stages` streamed tiles must fit. The kept
    list starts with the default for these arguments: what runs when autotuning is off."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d, dv, elt = args["BLOCK_D"], args["BLOCK_DV"], args["ELT_BYTES"]
        bucket = args["N_BUCKET"]
        # What stays on chip per row of the resident block: the forward's q only (its output is
        # an accumulator in registers); dQ's q and dO, dK/dV's k and v. Counting v beside the
        # forward's q pruned its fastest head-dim-256 tile (128 × 64, 8 warps, 2 stages: 192 KiB
        # by this count), which compiles and runs on an H100 (config_sweep.py, session 9).
        res_width = d if kernel == "fwd" else d + dv
        kept = []
        for c in configs:
            if id(c) in _LARGE_HEAD_ONLY and max(d, dv) <= 128:
                continue
            res, stream = c.kwargs[resident_block], c.kwargs[streamed_block]
            smem = (res * res_width + c.num_stages * stream * (d + dv)) * elt
            if smem <= _SMEM_BUDGET and max(res, stream) <= max(bucket, 64):
                kept.append(c)
        if not kept:
            smallest = min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
            kept = [triton.Config(dict(smallest.kwargs), num_warps=4, num_stages=1)]
        preferred = _head_dim_default(kernel, args)
        kept.sort(key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) != preferred)
        if not autotuning():
            kept = kept[:1]
        return kept

    return prune


# `cache_results` (persist autotune choices across processes) is newer than some supported
# Tritons; use it where the installed one has it.
_AUTOTUNE_EXTRA = (
    {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
)
_TUNE_KEY = [
    "BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_BIAS", "BIAS_IS_BOOL", "HAS_DROPOUT", "SCORES", "SPARSE", "N_BUCKET",
]


@triton.autotune(
    configs=_FWD_CONFIGS, key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", "fwd")}, **_AUTOTUNE_EXTRA,
)
@triton.jit
def _attn_fwd(
    Q, K, V, Bias, Seed, Out, Lse, Counts, Tiles, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_lm,
    stride_tb, stride_th, list_stride, row_len,
    Hq, G, Nq, Nk, qk_scale, cap_scale, drop_threshold, drop_scale, N_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ELT_BYTES: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCORES: tl.constexpr, SPARSE: tl.constexpr, TILE: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query block, b·Hq + h). With VARLEN, b is a sequence of the packed
    batch: its rows start at CuQ[b] / CuK[b] and Nq, Nk are its own lengths; programs past
    its end return at once, so padding costs nothing."""
    tl.static_assert(BLOCK_D >= D)
    tl.static_assert((not SPARSE) or (TILE % BLOCK_M == 0 and TILE % BLOCK_N == 0))
    # Inductor passes Python floats as float64 scalars; the arithmetic stays float32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    cap_scale = tl.cast(cap_scale, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    tl.static_assert(BLOCK_DV >= DV)
    pid_m = _row_block(CAUSAL)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // G
    start_m = pid_m * BLOCK_M
    q_start, Nq = _sequence(CuQ, b, Nq, VARLEN)
    k_start, Nk = _sequence(CuK, b, Nk, VARLEN)
    if VARLEN:
        if start_m >= Nq:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows = Q + b * stride_qb + h * stride_qh + q_start * stride_qm + offs_m[:, None] * stride_qm
    K_head = K + b * stride_kb + hk * stride_kh + k_start * stride_kn
    V_head = V + b * stride_vb + hk * stride_vh + k_start * stride_vn
    bias_rows = Bias + b * stride_bb + h * stride_bh + offs_m[:, None].to(tl.int64) * stride_bm
    if HAS_DROPOUT:
        philox_seed, philox_offset = _load_philox(Seed)
    else:
        philox_seed, philox_offset = 0, 0

    shift = _causal_shift(Nq, Nk, CAUSAL)

    # A float bias is added without the select that masks entries <= MASKED_BIAS (one
    # compare and one select per score: +3-9% forward without it, docs/design.md §19).
    # A masked entry then stays a number <= -1.44e30 in base 2, which adds exactly 0 to a row
    # whose max is above REDO_BELOW; a block with a row at or below it (every key masked by
    # such finite entries, or absurd biases near -1e30) is computed again with the select.
    acc, l_i, m_i = _attn_fwd_rows(
        q_rows, K_head, V_head, bias_rows, philox_seed, philox_offset, bh, offs_m, offs_d, offs_dv,
        Counts, Tiles, b, h, start_m, stride_kn, stride_vn, stride_bn, stride_tb, stride_th,
        list_stride, row_len, Nq, Nk, shift, qk_scale, cap_scale, drop_threshold,
        CAUSAL, D, DV, BLOCK_M, BLOCK_N, BLOCK_DV, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, DOT_PRECISION,
        SCORES, SPARSE, TILE, BIAS_IS_BOOL or not HAS_BIAS,
    )
    if HAS_BIAS and not BIAS_IS_BOOL:
        redo = (m_i > float("-inf")) & (m_i <= REDO_BELOW)
        if tl.max(redo.to(tl.int32), 0) > 0:
            # The whole block again (its other rows come out the same): merging rows would
            # keep two accumulators live, which spills.
            acc, l_i, m_i = _attn_fwd_rows(
                q_rows, K_head, V_head, bias_rows, philox_seed, philox_offset, bh, offs_m, offs_d, offs_dv,
                Counts, Tiles, b, h, start_m, stride_kn, stride_vn, stride_bn, stride_tb, stride_th,
                list_stride, row_len, Nq, Nk, shift, qk_scale, cap_scale, drop_threshold,
                CAUSAL, D, DV, BLOCK_M, BLOCK_N, BLOCK_DV, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT,
                DOT_PRECISION, SCORES, SPARSE, TILE, True,
            )

    # l = 0 exactly when the row saw no key (the row max contributes exp2(0) = 1 otherwise):
    # acc is 0 there too, so the row stores zeros and lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(empty, float("-inf"), (m_safe + tl.math.log2(l_safe)) * LN2)
    tl.store(
        Out + b * stride_ob + h * stride_oh + q_start * stride_om + offs_m[:, None] * stride_om + offs_dv[None, :],
        out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < DV),
    )
    tl.store(Lse + b * stride_lb + h * stride_lh + (q_start + offs_m) * stride_lm, lse, mask=offs_m < Nq)


# =============================================================================================
# Backward: delta = rowsum(dO ∘ O) - dlse, then dK/dV, then dQ (+ dS for the bias gradient)
# =============================================================================================


@triton.jit
def _attn_bwd_preprocess(
    Out, DOut, DLse, Delta, DQAcc, Lse, LseLog2,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    Hq, Nq, keep_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_DLSE: tl.constexpr, ZERO_DQ: tl.constexpr, LSE_LOG2: tl.constexpr, KEEP_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO ∘ O) - dlse; with ZERO_DQ also zeroes the fused backward's dQ
    accumulator ([B, Hq, Nq, D] float32, contiguous), which saves a memset launch; with LSE_LOG2
    writes lse · log2(e), +inf where lse is -inf (the CUTLASS backward's form of it), and with
    KEEP_SCALE folds dropout's 1 / (1-p) = 2^keep_log2 into both: lse · log2(e) - keep_log2 and
    delta / 2^keep_log2 (what the CUTLASS dropout backward takes)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < Nq) & (offs_dv[None, :] < DV)
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
        mask=mask, other=0.0,
    )
    do = tl.load(
        DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
        mask=mask, other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = bh.to(tl.int64) * Nq + offs_m
    if HAS_DLSE:
        # d lse / d s = p, so an incoming dlse enters dS = p ∘ (dP - delta) through delta.
        delta -= tl.load(DLse + row, mask=offs_m < Nq, other=0.0)
    if KEEP_SCALE:
        delta = delta * tl.exp2(-keep_log2)
    tl.store(Delta + row, delta, mask=offs_m < Nq)
    if LSE_LOG2:
        lse = tl.load(Lse + row, mask=offs_m < Nq, other=0.0)
        lse_log2 = lse * LOG2E
        if KEEP_SCALE:
            lse_log2 = lse_log2 - keep_log2
        tl.store(LseLog2 + row, tl.where(lse == float("-inf"), float("inf"), lse_log2), mask=offs_m < Nq)
    if ZERO_DQ:
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(
            DQAcc + row[:, None] * D + offs_d[None, :], tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
            mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D),
        )


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    Q_head, DO_head, Lse_head, Delta_head, DQ_head, bias_cols, philox_seed, philox_offset, bh,
    start_n, offs_n, offs_d, offs_dv, lo, hi, tiles,
    stride_qm, stride_dom, stride_bm, stride_lm,
    Nq, Nk, shift, qk_scale, cap_scale, drop_threshold, drop_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASK_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, SCORES: tl.constexpr,
    SPARSE: tl.constexpr, TILE: tl.constexpr, FUSED_DQ: tl.constexpr,
):
    """Accumulate this key block's dK, dV over query rows [lo, hi) of one query head (on sᵀ);
    with SPARSE, over the blocks of the `hi` query tiles listed at `tiles` (a range when they
    are consecutive, `_listed_range`). With FUSED_DQ, also add each row block's dQ share into
    the float32 accumulator at DQ_head (atomics)."""
    if SPARSE:
        n_listed, lo, hi = _listed_range(lo, hi, tiles, TILE)
        for it in range(0, n_listed * (TILE // BLOCK_M)):
            start_m = _listed_block(it, tiles, TILE, BLOCK_M)
            dk, dv = _attn_bwd_dkdv_step(
                dk, dv, k, v, start_m, Q_head, DO_head, Lse_head, Delta_head, DQ_head, bias_cols, philox_seed,
                philox_offset, bh, start_n, offs_n, offs_d, offs_dv, stride_qm, stride_dom, stride_bm, stride_lm,
                Nq, Nk, shift, qk_scale, cap_scale, drop_threshold, drop_scale, D, DV, BLOCK_M, BLOCK_N,
                HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, MASK_CAUSAL, DOT_PRECISION, SCORES, FUSED_DQ,
            )
    for start_m in range(lo, hi, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_step(
            dk, dv, k, v, start_m, Q_head, DO_head, Lse_head, Delta_head, DQ_head, bias_cols, philox_seed,
            philox_offset, bh, start_n, offs_n, offs_d, offs_dv, stride_qm, stride_dom, stride_bm, stride_lm,
            Nq, Nk, shift, qk_scale, cap_scale, drop_threshold, drop_scale, D, DV, BLOCK_M, BLOCK_N,
            HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, MASK_CAUSAL, DOT_PRECISION, SCORES, FUSED_DQ,
        )
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_step(
    dk, dv, k, v, start_m,
    Q_head, DO_head, Lse_head, Delta_head, DQ_head, bias_cols, philox_seed, philox_offset, bh,
    start_n, offs_n, offs_d, offs_dv,
    stride_qm, stride_dom, stride_bm, stride_lm,
    Nq, Nk, shift, qk_scale, cap_scale, drop_threshold, drop_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASK_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, SCORES: tl.constexpr,
    FUSED_DQ: tl.constexpr,
):
    n_ok = offs_n[:, None] < Nk
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Nq
    b = _load_bias(
        bias_cols + offs_m[None, :].to(tl.int64) * stride_bm, n_ok & m_ok[None, :], HAS_BIAS
    )
    qT = tl.load(
        Q_head + offs_m[None, :] * stride_qm + offs_d[:, None],
        mask=m_ok[None, :] & (offs_d[:, None] < D), other=0.0,
    )
    lse2 = _backward_lse2(tl.load(Lse_head + offs_m * stride_lm, mask=m_ok, other=float("-inf")))
    sT, tT = _scaled_scores(tl.dot(k, qT, input_precision=DOT_PRECISION), qk_scale, cap_scale, SCORES)
    sT = _masked_scores(
        sT, offs_m[None, :], offs_n[:, None], b, Nk, shift,
        HAS_BIAS, BIAS_IS_BOOL, False, MASK_CAUSAL, False,
    )
    pT = tl.math.exp2(sT - lse2[None, :])
    do = tl.load(
        DO_head + offs_m[:, None] * stride_dom + offs_dv[None, :],
        mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
    )
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keepT = _dropout_keep(
            philox_seed, philox_offset, bh, offs_m, start_n, drop_threshold,
            BLOCK_M, BLOCK_N, True,
        )
        pdT = tl.where(keepT, pT, 0.0)
        dpT = tl.where(keepT, dpT * drop_scale, 0.0)
    else:
        pdT = pT
    # dV's 1/(1-p) is applied once, after the loop.
    dv += tl.dot(pdT.to(do.dtype), do, input_precision=DOT_PRECISION)
    delta = tl.load(Delta_head + offs_m * stride_lm, mask=m_ok, other=0.0)
    dsT = pT * (dpT - delta[None, :])
    if SCORES == SCORES_CAPPED:
        dsT = dsT * (1.0 - tT * tT)
    dsT = dsT.to(qT.dtype)
    dk += tl.dot(dsT, tl.trans(qT), input_precision=DOT_PRECISION)
    if FUSED_DQ:
        # Keys past Nk were loaded as zeros, so their (nonzero) dS rows add nothing here.
        dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION)
        tl.atomic_add(
            DQ_head + offs_m[:, None] * D + offs_d[None, :], dq,
            mask=m_ok[:, None] & (offs_d[None, :] < D), sem="relaxed",
        )
    return dk, dv


@triton.jit
def _dkdv_program(
    pid_n, bhk,
    Q, K, V, Bias, Seed, DO, Lse, Delta, DK, DV_, DQAcc, Counts, Tiles, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_lm,
    stride_tb, stride_th, list_stride, row_len,
    Hq, G, Nq, Nk, qk_scale, cap_scale, sm_scale, drop_threshold, drop_scale, N_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ELT_BYTES: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCORES: tl.constexpr, SPARSE: tl.constexpr, TILE: tl.constexpr, VARLEN: tl.constexpr,
    FUSED_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (b, KV head, key block); loops over the G query heads of its group.
    Lse and Delta share one layout (strides stride_l*); VARLEN as in `_attn_fwd`. With FUSED_DQ
    it also accumulates dQ / sm_scale into DQAcc ([B, Hq, Nq, D] float32, zeroed beforehand) and
    the dQ kernel is not launched (`fused_dq`)."""
    tl.static_assert(BLOCK_D >= D)
    tl.static_assert(not (FUSED_DQ and VARLEN))
    tl.static_assert((not SPARSE) or (TILE % BLOCK_M == 0 and TILE % BLOCK_N == 0))
    qk_scale = tl.cast(qk_scale, tl.float32)
    cap_scale = tl.cast(cap_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    tl.static_assert(BLOCK_DV >= DV)
    Hkv = Hq // G
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    q_start, Nq = _sequence(CuQ, b, Nq, VARLEN)
    k_start, Nk = _sequence(CuK, b, Nk, VARLEN)
    if VARLEN:
        if start_n >= Nk:
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Nk
    k = tl.load(
        K + b * stride_kb + hk * stride_kh + (k_start + offs_n[:, None]) * stride_kn + offs_d[None, :],
        mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + (k_start + offs_n[:, None]) * stride_vn + offs_dv[None, :],
        mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
    )
    if HAS_DROPOUT:
        philox_seed, philox_offset = _load_philox(Seed)
    else:
        philox_seed, philox_offset = 0, 0

    shift = _causal_shift(Nq, Nk, CAUSAL)
    if CAUSAL != CAUSAL_NONE:
        # Rows before lo see none of these keys (skipped); [lo, mid) is the diagonal band
        # (element mask); rows from mid on see the whole block. Keys >= Nk (last block)
        # need no mask here: their dK/dV rows are never stored and rows do not mix.
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum(
            (tl.maximum(start_n + BLOCK_N - 1 - shift, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, Nq
        )
    else:
        lo = 0
        mid = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = (b * Hq + h).to(tl.int32)
        Q_head = Q + b * stride_qb + h * stride_qh + q_start * stride_qm
        DO_head = DO + b * stride_dob + h * stride_doh + q_start * stride_dom
        Lse_head = Lse + b * stride_lb + h * stride_lh + q_start * stride_lm
        Delta_head = Delta + b * stride_lb + h * stride_lh + q_start * stride_lm
        DQ_head = DQAcc + (b * Hq + h) * Nq * D
        bias_cols = Bias + b * stride_bb + h * stride_bh + offs_n[:, None] * stride_bn
        if SPARSE:
            n_partial, partial, n_full, full = _tile_lists(
                Counts, Tiles, b, h, start_n // TILE, stride_tb, stride_th, list_stride, row_len
            )
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head, DQ_head, bias_cols,
                philox_seed, philox_offset, bh, start_n, offs_n, offs_d, offs_dv, 0, n_partial, partial,
                stride_qm, stride_dom, stride_bm, stride_lm, Nq, Nk, shift, qk_scale, cap_scale,
                drop_threshold, drop_scale, D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT,
                CAUSAL != CAUSAL_NONE, DOT_PRECISION, SCORES, True, TILE, FUSED_DQ,
            )
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head, DQ_head, bias_cols,
                philox_seed, philox_offset, bh, start_n, offs_n, offs_d, offs_dv, 0, n_full, full,
                stride_qm, stride_dom, stride_bm, stride_lm, Nq, Nk, shift, qk_scale, cap_scale,
                drop_threshold, drop_scale, D, DV, BLOCK_M, BLOCK_N, False, False, HAS_DROPOUT, False,
                DOT_PRECISION, SCORES, True, TILE, FUSED_DQ,
            )
        else:
            if CAUSAL != CAUSAL_NONE:
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head, DQ_head, bias_cols,
                    philox_seed, philox_offset, bh, start_n, offs_n, offs_d, offs_dv, lo, mid, Tiles,
                    stride_qm, stride_dom, stride_bm, stride_lm, Nq, Nk, shift, qk_scale, cap_scale,
                    drop_threshold, drop_scale, D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT,
                    True, DOT_PRECISION, SCORES, False, TILE, FUSED_DQ,
                )
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head, DQ_head, bias_cols,
                philox_seed, philox_offset, bh, start_n, offs_n, offs_d, offs_dv, mid, Nq, Tiles,
                stride_qm, stride_dom, stride_bm, stride_lm, Nq, Nk, shift, qk_scale, cap_scale,
                drop_threshold, drop_scale, D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT,
                False, DOT_PRECISION, SCORES, False, TILE, FUSED_DQ,
            )

    dk *= sm_scale
    dv *= drop_scale
    tl.store(
        DK + b * stride_dkb + hk * stride_dkh + (k_start + offs_n[:, None]) * stride_dkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DV_ + b * stride_dvb + hk * stride_dvh + (k_start + offs_n[:, None]) * stride_dvn + offs_dv[None, :],
        dv.to(DV_.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < DV),
    )


@triton.autotune(
    configs=_DKDV_CONFIGS, key=_TUNE_KEY + ["FUSED_DQ"],
    prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", "dkdv")},
    # Every timed run adds into the dQ accumulator, and Triton times even a lone candidate.
    restore_value=["DQAcc"], **_AUTOTUNE_EXTRA,
)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Bias, Seed, DO, Lse, Delta, DK, DV_, DQAcc, Counts, Tiles, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_lm,
    stride_tb, stride_th, list_stride, row_len,
    Hq, G, Nq, Nk, qk_scale, cap_scale, sm_scale, drop_threshold, drop_scale, N_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ELT_BYTES: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCORES: tl.constexpr, SPARSE: tl.constexpr, TILE: tl.constexpr, VARLEN: tl.constexpr,
    FUSED_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The launch of `_dkdv_program`, one program per (key block, b · KV head)."""
    _dkdv_program(tl.program_id(0), tl.program_id(1), Q, K, V, Bias, Seed, DO, Lse, Delta, DK, DV_, DQAcc, Counts, Tiles, CuQ, CuK, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_lb, stride_lh, stride_lm, stride_tb, stride_th, list_stride, row_len, Hq, G, Nq, Nk, qk_scale, cap_scale, sm_scale, drop_threshold, drop_scale, N_BUCKET, D, DV, BLOCK_D, BLOCK_DV, ELT_BYTES, CAUSAL, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, DOT_PRECISION, SCORES, SPARSE, TILE, VARLEN, FUSED_DQ, BLOCK_M, BLOCK_N)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
    K_head, V_head, bias_rows, DS_rows, philox_seed, philox_offset, bh,
    offs_m, offs_d, offs_dv, lo, hi, tiles,
    stride_kn, stride_vn, stride_bn,
    Nq, Nk, shift, qk_scale, cap_scale, drop_threshold, drop_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_DS: tl.constexpr, MASK_KEYS: tl.constexpr, MASK_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCORES: tl.constexpr, SPARSE: tl.constexpr, TILE: tl.constexpr,
):
    """Key blocks [lo, hi), or with SPARSE the blocks of the `hi` key tiles listed at `tiles`
    (a range when they are consecutive, `_listed_range`)."""
    if SPARSE:
        n_listed, lo, hi = _listed_range(lo, hi, tiles, TILE)
        for it in range(0, n_listed * (TILE // BLOCK_N)):
            start_n = _listed_block(it, tiles, TILE, BLOCK_N)
            dq = _attn_bwd_dq_step(
                dq, q, do, lse2, delta, start_n, K_head, V_head, bias_rows, DS_rows, philox_seed,
                philox_offset, bh, offs_m, offs_d, offs_dv, stride_kn, stride_vn, stride_bn, Nq, Nk,
                shift, qk_scale, cap_scale, drop_threshold, drop_scale, D, DV, BLOCK_M, BLOCK_N, HAS_BIAS,
                BIAS_IS_BOOL, HAS_DROPOUT, STORE_DS, MASK_KEYS, MASK_CAUSAL, DOT_PRECISION, SCORES,
            )
    for start_n in range(lo, hi, BLOCK_N):
        dq = _attn_bwd_dq_step(
            dq, q, do, lse2, delta, start_n, K_head, V_head, bias_rows, DS_rows, philox_seed,
            philox_offset, bh, offs_m, offs_d, offs_dv, stride_kn, stride_vn, stride_bn, Nq, Nk,
            shift, qk_scale, cap_scale, drop_threshold, drop_scale, D, DV, BLOCK_M, BLOCK_N, HAS_BIAS,
            BIAS_IS_BOOL, HAS_DROPOUT, STORE_DS, MASK_KEYS, MASK_CAUSAL, DOT_PRECISION, SCORES,
        )
    return dq


@triton.jit
def _attn_bwd_dq_step(
    dq, q, do, lse2, delta, start_n,
    K_head, V_head, bias_rows, DS_rows, philox_seed, philox_offset, bh,
    offs_m, offs_d, offs_dv,
    stride_kn, stride_vn, stride_bn,
    Nq, Nk, shift, qk_scale, cap_scale, drop_threshold, drop_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_DS: tl.constexpr, MASK_KEYS: tl.constexpr, MASK_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCORES: tl.constexpr,
):
    m_ok = offs_m[:, None] < Nq
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < Nk) | (not MASK_KEYS)  # as in `_attn_fwd_step`
    kT = tl.load(
        K_head + offs_n[None, :] * stride_kn + offs_d[:, None],
        mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0,
    )
    vT = tl.load(
        V_head + offs_n[None, :] * stride_vn + offs_dv[:, None],
        mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0,
    )
    s, t = _scaled_scores(tl.dot(q, kT, input_precision=DOT_PRECISION), qk_scale, cap_scale, SCORES)
    b = _load_bias(bias_rows + offs_n[None, :] * stride_bn, m_ok & n_ok[None, :], HAS_BIAS)
    s = _masked_scores(
        s, offs_m[:, None], offs_n[None, :], b, Nk, shift,
        HAS_BIAS, BIAS_IS_BOOL, MASK_KEYS, MASK_CAUSAL, False,
    )
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(
            philox_seed, philox_offset, bh, offs_m, start_n, drop_threshold,
            BLOCK_M, BLOCK_N, False,
        )
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if STORE_DS:
        tl.store(
            DS_rows + offs_n[None, :], ds.to(DS_rows.dtype.element_ty),
            mask=(offs_m[:, None] < Nq) & n_ok[None, :],
        )
    if SCORES == SCORES_CAPPED:
        # The bias is added after the cap (its gradient is dS above); q·kᵀ is under it.
        ds = ds * (1.0 - t * t)
    dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_program(
    pid_m, bh,
    Q, K, V, Bias, Seed, DO, Lse, Delta, DQ, DS, Counts, Tiles, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_lm,
    stride_tb, stride_th, list_stride, row_len,
    Hq, G, Nq, Nk, qk_scale, cap_scale, sm_scale, drop_threshold, drop_scale, N_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ELT_BYTES: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCORES: tl.constexpr, SPARSE: tl.constexpr, TILE: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (b, query head, query block); loops over key blocks like the forward.

    With STORE_DS it also writes dS ([B, Hq, Nq, Nk] in DS's dtype, natural layout so the
    stores are coalesced) for the bias gradient, every element of it.
    """
    tl.static_assert(BLOCK_D >= D)
    tl.static_assert((not SPARSE) or (TILE % BLOCK_M == 0 and TILE % BLOCK_N == 0))
    qk_scale = tl.cast(qk_scale, tl.float32)
    cap_scale = tl.cast(cap_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    tl.static_assert(BLOCK_DV >= DV)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // G
    start_m = pid_m * BLOCK_M
    q_start, Nq = _sequence(CuQ, b, Nq, VARLEN)
    k_start, Nk = _sequence(CuK, b, Nk, VARLEN)
    if VARLEN:
        if start_m >= Nq:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Nq
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + (q_start + offs_m[:, None]) * stride_qm + offs_d[None, :],
        mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + (q_start + offs_m[:, None]) * stride_dom + offs_dv[None, :],
        mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
    )
    row = b * stride_lb + h * stride_lh + (q_start + offs_m) * stride_lm
    lse2 = _backward_lse2(tl.load(Lse + row, mask=m_ok, other=float("-inf")))
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)
    K_head = K + b * stride_kb + hk * stride_kh + k_start * stride_kn
    V_head = V + b * stride_vb + hk * stride_vh + k_start * stride_vn
    bias_rows = Bias + b * stride_bb + h * stride_bh + offs_m[:, None].to(tl.int64) * stride_bm
    DS_rows = DS + (bh.to(tl.int64) * Nq + offs_m)[:, None] * Nk
    if HAS_DROPOUT:
        philox_seed, philox_offset = _load_philox(Seed)
    else:
        philox_seed, philox_offset = 0, 0

    shift = _causal_shift(Nq, Nk, CAUSAL)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SPARSE:
        # dS is zero-initialised by the caller: skipped tiles have dS = 0.
        n_partial, partial, n_full, full = _tile_lists(
            Counts, Tiles, b, h, start_m // TILE, stride_tb, stride_th, list_stride, row_len
        )
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, K_head, V_head, bias_rows, DS_rows, philox_seed, philox_offset,
            bh, offs_m, offs_d, offs_dv, 0, n_partial, partial, stride_kn, stride_vn, stride_bn,
            Nq, Nk, shift, qk_scale, cap_scale, drop_threshold, drop_scale,
            D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, STORE_DS, True,
            CAUSAL != CAUSAL_NONE, DOT_PRECISION, SCORES, True, TILE,
        )
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, K_head, V_head, bias_rows, DS_rows, philox_seed, philox_offset,
            bh, offs_m, offs_d, offs_dv, 0, n_full, full, stride_kn, stride_vn, stride_bn,
            Nq, Nk, shift, qk_scale, cap_scale, drop_threshold, drop_scale,
            D, DV, BLOCK_M, BLOCK_N, False, False, HAS_DROPOUT, STORE_DS, False, False,
            DOT_PRECISION, SCORES, True, TILE,
        )
    else:
        hi, mid = _key_ranges(start_m, Nk, shift, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, K_head, V_head, bias_rows, DS_rows, philox_seed, philox_offset,
            bh, offs_m, offs_d, offs_dv, 0, mid, Tiles, stride_kn, stride_vn, stride_bn,
            Nq, Nk, shift, qk_scale, cap_scale, drop_threshold, drop_scale,
            D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, STORE_DS, False, False,
            DOT_PRECISION, SCORES, False, TILE,
        )
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, K_head, V_head, bias_rows, DS_rows, philox_seed,
            philox_offset, bh, offs_m, offs_d, offs_dv, mid, hi, Tiles, stride_kn, stride_vn,
            stride_bn, Nq, Nk, shift, qk_scale, cap_scale, drop_threshold, drop_scale,
            D, DV, BLOCK_M, BLOCK_N, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, STORE_DS, True,
            CAUSAL != CAUSAL_NONE, DOT_PRECISION, SCORES, False, TILE,
        )
        if STORE_DS and CAUSAL != CAUSAL_NONE:
            # dS is allocated uninitialised: the key blocks causal skipped are written as zeros
            # here (from where the band loop stopped), so no separate memset pass is needed.
            written = tl.maximum(mid + tl.cdiv(hi - mid, BLOCK_N) * BLOCK_N, 0)
            zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=DS.dtype.element_ty)
            for start_n in range(written, Nk, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                tl.store(DS_rows + offs_n[None, :], zeros, mask=m_ok[:, None] & (offs_n[None, :] < Nk))
    dq *= sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + (q_start + offs_m[:, None]) * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D),
    )


@triton.autotune(
    configs=_DQ_CONFIGS, key=_TUNE_KEY + ["STORE_DS"],
    prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", "dq")}, **_AUTOTUNE_EXTRA,
)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, Bias, Seed, DO, Lse, Delta, DQ, DS, Counts, Tiles, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_lm,
    stride_tb, stride_th, list_stride, row_len,
    Hq, G, Nq, Nk, qk_scale, cap_scale, sm_scale, drop_threshold, drop_scale, N_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ELT_BYTES: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCORES: tl.constexpr, SPARSE: tl.constexpr, TILE: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The launch of `_dq_program`, one program per (query block, b · query head)."""
    _dq_program(_row_block(CAUSAL), tl.program_id(1), Q, K, V, Bias, Seed, DO, Lse, Delta, DQ, DS, Counts, Tiles, CuQ, CuK, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm, stride_lb, stride_lh, stride_lm, stride_tb, stride_th, list_stride, row_len, Hq, G, Nq, Nk, qk_scale, cap_scale, sm_scale, drop_threshold, drop_scale, N_BUCKET, D, DV, BLOCK_D, BLOCK_DV, ELT_BYTES, CAUSAL, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, STORE_DS, DOT_PRECISION, SCORES, SPARSE, TILE, VARLEN, BLOCK_M, BLOCK_N)


@triton.jit
def _attn_bwd_joint(
    Q, K, V, Bias, Seed, DO, Lse, Delta, DK, DV_, DQ, DS, Unused,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_lm,
    Hq, G, Nq, Nk, qk_scale, cap_scale, sm_scale, drop_threshold, drop_scale, N_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ELT_BYTES: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCORES: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    """dK/dV and dQ in one grid, as FlexAttention's backward runs them: per b · query head, the
    first cdiv(Nk, BLOCK_N1) programs are `_attn_bwd_dkdv`'s (BLOCK_M1 × BLOCK_N1 tiles; with
    grouped heads only the first B · Hkv rows of the grid have them), the rest `_attn_bwd_dq`'s
    (BLOCK_M2 × BLOCK_N2, longest first under causal). The short programs of either kind then
    fill the other's last wave, and the backward is one launch fewer. Dense inputs only: no mask
    tiles, no packed sequences, no fused dQ."""
    pid = tl.program_id(0)
    n_kv = tl.cdiv(Nk, BLOCK_N1)
    if pid < n_kv:
        bhk = tl.program_id(1)
        if bhk < tl.num_programs(1) // G:
            _dkdv_program(
                pid, bhk, Q, K, V, Bias, Seed, DO, Lse, Delta, DK, DV_, Unused, Unused, Unused, Unused, Unused,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_doh, stride_dom,
                stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                stride_lb, stride_lh, stride_lm, 0, 0, 0, 0,
                Hq, G, Nq, Nk, qk_scale, cap_scale, sm_scale, drop_threshold, drop_scale, N_BUCKET,
                D, DV, BLOCK_D, BLOCK_DV, ELT_BYTES, CAUSAL, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, DOT_PRECISION,
                SCORES, False, 128, False, False, BLOCK_M1, BLOCK_N1,
            )
    else:
        pid_m = pid - n_kv
        if CAUSAL != CAUSAL_NONE:
            pid_m = tl.cdiv(Nq, BLOCK_M2) - 1 - pid_m
        _dq_program(
            pid_m, tl.program_id(1), Q, K, V, Bias, Seed, DO, Lse, Delta, DQ, DS, Unused, Unused, Unused, Unused,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_doh, stride_dom,
            stride_dqb, stride_dqh, stride_dqm, stride_lb, stride_lh, stride_lm, 0, 0, 0, 0,
            Hq, G, Nq, Nk, qk_scale, cap_scale, sm_scale, drop_threshold, drop_scale, N_BUCKET,
            D, DV, BLOCK_D, BLOCK_DV, ELT_BYTES, CAUSAL, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, STORE_DS,
            DOT_PRECISION, SCORES, False, 128, False, BLOCK_M2, BLOCK_N2,
        )


# =============================================================================================
# Launch glue
# =============================================================================================

_LOG2E = 1.4426950408889634
_PREPROCESS_BLOCK_M = 16 if _interpreting() else 64


def _block(d: int) -> int:
    # tl.dot needs every dim >= 16; padded columns are masked to 0 on load.
    return max(16, triton.next_power_of_2(d))


def _bias_args(inp: AttentionInputs, dummy: torch.Tensor, launch=None):
    """(pointer tensor, 4 strides) with stride 0 on the size-1 (broadcast) dims.

    A bool mask is read as uint8 (sidesteps i1 pointer handling across Triton versions): a
    free view when called eagerly; traced for Inductor (`launch` is wrap_triton), a copy, as
    Inductor cannot lower a bool -> uint8 view."""
    b4 = inp.bias_4d()
    if b4 is None:
        return dummy, (0, 0, 0, 0)
    if b4.shape[-1] > 1 and b4.stride(-1) != 1:
        # Keys strided apart (T5's position bias is an embedding permuted to [1, H, Nq, Nk],
        # its key stride is H): every bias load would be uncoalesced, 5-7× slower per call in
        # the T5 profile (RESULTS.md). One copy of the unbroadcast part, keys contiguous.
        b4 = b4[tuple(slice(0, 1) if b4.stride(i) == 0 else slice(None) for i in range(4))].contiguous()
    if b4.dtype == torch.bool:
        b4 = b4.view(torch.uint8) if launch in (None, _direct) else b4.to(torch.uint8)
    strides = tuple(0 if b4.shape[i] == 1 else b4.stride(i) for i in range(4))
    return b4, strides


def _scores_mode(inp: AttentionInputs) -> int:
    if inp.softcap > 0.0:
        return SCORES_CAPPED.value
    return SCORES_FOLDED.value if inp.scale > 0.0 else SCORES_SCALED.value


def _common_meta(inp: AttentionInputs) -> dict:
    """Constexpr switches shared by the three autotuned kernels (also the autotune key)."""
    return dict(
        D=inp.head_dim, DV=inp.head_dim_v,
        BLOCK_D=_block(inp.head_dim), BLOCK_DV=_block(inp.head_dim_v),
        ELT_BYTES=inp.q.element_size(), CAUSAL=int(inp.causal),
        HAS_BIAS=inp.bias is not None, BIAS_IS_BOOL=inp.bias_kind == "bool",
        HAS_DROPOUT=inp.dropout_p > 0.0, SCORES=_scores_mode(inp),
        # float32 promises float32 results: exact dots, not TF32.
        DOT_PRECISION="ieee" if inp.dtype == torch.float32 else "tf32",
    )


def dropout_threshold(p: float) -> int:
    """round(p · 2^16): a 16-bit draw below it drops its score. The CUTLASS forward takes the same
    number (backends/cutlass.py), so both draw one mask."""
    return int(round(p * (1 << DROPOUT_BITS.value)))


def _scalars(inp: AttentionInputs) -> dict:
    p, c = inp.dropout_p, inp.softcap
    return dict(
        # With soft-capping the dot is scaled into tanh's argument, the cap then into base 2
        # (`_scaled_scores`).
        qk_scale=inp.scale / c if c else inp.scale * _LOG2E,
        cap_scale=c * _LOG2E if c else 1.0,
        drop_threshold=dropout_threshold(p),
        drop_scale=1.0 / (1.0 - p),
        # Autotune once per power-of-two length bucket, not once per sequence length.
        N_BUCKET=triton.next_power_of_2(max(inp.len_q, inp.len_k, 16)),
    )


def _direct(kernel):
    return kernel


def _unused(q: torch.Tensor, launch) -> torch.Tensor:
    """The tensor passed for pointer arguments a launch never touches (no bias, no dropout seed,
    no tile lists, no sequence offsets, no dS).

    Eagerly, q itself (nothing allocated). Traced for Inductor (`launch` is wrap_triton), a fresh
    empty tensor: torch works out which arguments a kernel writes from its TTIR, and that
    analysis is conservative: it names unused pointers among the written ones (torch 2.13 reports
    CuQ / CuK as written by all three kernels, which only read them under VARLEN; on torch 2.11
    the backward's q placeholder came out written). Were q the placeholder, the trace would
    write back into a leaf that requires grad and AOTAutograd would refuse the graph (a CUTLASS
    forward followed by the in-graph Triton backward failed exactly so on the GPU).
    An output passed again as a placeholder would be returned from the wrong copy."""
    return q if launch is _direct else torch.empty(0, dtype=q.dtype, device=q.device)


def _tiles(inp: AttentionInputs, bias, sb, launch) -> mask_tiles.MaskTiles | None:
    """Skippable and bias-free tiles of a mask-like bias (mask_tiles.py), or None: dense loops."""
    return mask_tiles.classify(inp, bias, sb, launch, by_key=False) if mask_tiles.worth_it(inp) else None


def _tile_args(tiles: mask_tiles.MaskTiles | None, by_query: bool, placeholder: torch.Tensor):
    """(Counts, Tiles) pointers and (stride_tb, stride_th, list_stride, row_len) for a kernel.

    Unused pointer arguments get `placeholder` (`_unused`)."""
    if tiles is None:
        return (placeholder, placeholder), (0, 0, 0, 0)
    a = tiles.query_args() if by_query else tiles.key_args()
    return a[:2], a[2:]


def forward(
    inp: AttentionInputs, seed: torch.Tensor | None, launch=_direct
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Nq, Dv] in q's dtype and lse [B, Hq, Nq] float32 (natural log).

    `launch` wraps each kernel before its launch: identity when called eagerly,
    `torch.library.wrap_triton` when traced for Inductor (flash_inductor.kernels_in_graph).
    """
    B, Hq, Nq, Nk = inp.batch, inp.heads_q, inp.len_q, inp.len_k
    out = empty_in_layout(inp.q, (B, Hq, Nq, inp.head_dim_v))
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=inp.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if Nk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    q, k, v = _unit_last(inp.q), _unit_last(inp.k), _unit_last(inp.v)
    unused = _unused(q, launch)
    bias, sb = _bias_args(inp, unused, launch)
    sc = _scalars(inp)
    tiles = _tiles(inp, bias, sb, launch)
    tile_ptrs, tile_strides = _tile_args(tiles, True, unused)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    launch(_attn_fwd)[grid](
        q, k, v, bias, seed if seed is not None else unused, out, lse, *tile_ptrs, unused, unused,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *sb,
        out.stride(0), out.stride(1), out.stride(2),
        *lse.stride(),
        *tile_strides,
        Hq, Hq // inp.heads_kv, Nq, Nk,
        sc["qk_scale"], sc["cap_scale"], sc["drop_threshold"], sc["drop_scale"], sc["N_BUCKET"],
        SPARSE=tiles is not None, TILE=mask_tiles.TILE, VARLEN=False, **_common_meta(inp),
    )
    return out, lse


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; the interpreter's CPU tensors count as an H100's 132."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


# What `_prune` and `_head_dim_default` read of a launch's arguments.
_PRUNE_READS = ("BLOCK_D", "BLOCK_DV", "ELT_BYTES", "N_BUCKET", "CAUSAL", "HAS_BIAS", "BIAS_IS_BOOL")


@functools.lru_cache(maxsize=256)
def _backward_defaults(*values):
    """The dK/dV and dQ kernels' default configs for these `_PRUNE_READS` values: the first of
    each pruned list, the same whether autotuning is on. Cached: pruning both lists took about
    20 µs of host time per backward call."""
    args = dict(zip(_PRUNE_READS, values))
    return (_prune("BLOCK_M", "BLOCK_N", "dkdv")(list(_DKDV_CONFIGS), args)[0],
            _prune("BLOCK_N", "BLOCK_M", "dq")(list(_DQ_CONFIGS), args)[0])


def _joint_configs(meta: dict, sc: dict, Nk: int, kv_heads: int, device: torch.device):
    """((BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2), warps, stages) for `_attn_bwd_joint`, or None.

    The joint grid pays where a kernel of its own would leave SMs idle: under causal (programs
    of unequal length, so a ragged last wave at every size) and where the dK/dV grid is under
    two waves. Measured on an H100 (session 15, device time, D=128): causal +13-17% at
    2048-4096 and +5-8% at 8192; no mask +10% at 2048 (1.5 waves) but -2% at 4096 (2.9 waves);
    bias -3% at 8192. Only where the dK/dV and dQ defaults share their warps and stages (a grid
    has one of each); FLASH_INDUCTOR_BWD_JOINT=0 turns it off."""
    if os.environ.get("FLASH_INDUCTOR_BWD_JOINT", "1") != "1":
        return None
    kv, qd = _backward_defaults(*(({**meta, **sc})[name] for name in _PRUNE_READS))
    if (kv.num_warps, kv.num_stages) != (qd.num_warps, qd.num_stages):
        return None
    kv_programs = triton.cdiv(Nk, kv.kwargs["BLOCK_N"]) * kv_heads
    if meta["CAUSAL"] == int(Causal.NONE) and kv_programs >= 2 * _sm_count(device):
        return None
    return (kv.kwargs["BLOCK_M"], kv.kwargs["BLOCK_N"], qd.kwargs["BLOCK_M"], qd.kwargs["BLOCK_N"]), kv.num_warps, kv.num_stages


def preprocess(out, dout, dlse, delta, dq_acc, head_dim: int, launch=_direct, lse=None, lse_log2=None,
               keep_scale: float = 1.0):
    """delta = rowsum(dout ∘ out) - dlse into `delta` ([B, H, Nq] float32, contiguous); zeroes
    `dq_acc` ([B, H, Nq, head_dim] float32, contiguous) unless it is empty. out and dout have a
    unit last stride. Also the CUTLASS backward's first step (backends/cutlass.py), which passes
    `lse` and gets `lse_log2` = lse · log2(e), +inf where lse is -inf (both [B, H, Nq] float32,
    contiguous): what its consumer subtracts, computed once per row instead of once per tile.
    There, dropout's `keep_scale` 1 / (1-p) is folded in: lse_log2 - log2(keep_scale) and
    delta / keep_scale (csrc/flash_cutlass_bwd.h)."""
    B, H, Nq, DV = out.shape
    keep_log2 = math.log2(keep_scale)
    launch(_attn_bwd_preprocess)[(triton.cdiv(Nq, _PREPROCESS_BLOCK_M), B * H)](
        out, dout, dlse.contiguous() if dlse is not None else delta, delta, dq_acc,
        lse if lse is not None else delta, lse_log2 if lse_log2 is not None else delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        H, Nq, keep_log2,
        D=head_dim, BLOCK_D=_block(head_dim), DV=DV, BLOCK_DV=_block(DV),
        HAS_DLSE=dlse is not None, ZERO_DQ=dq_acc.numel() > 0, LSE_LOG2=lse_log2 is not None,
        KEEP_SCALE=keep_scale != 1.0, BLOCK_M=_PREPROCESS_BLOCK_M,
    )


def backward(
    inp: AttentionInputs,
    seed: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    bias_requires_grad: bool,
    launch=_direct,
):
    """(dq, dk, dv, dbias or None), FlashAttention-2 style: deterministic (no atomics) unless
    `fused_dq` says the dK/dV kernel adds dQ in with atomics (dropout's default).

    The bias gradient is dS summed over the bias's broadcast dims. dS is written in the bias's
    dtype to a [B, Hq, Nq, Nk] buffer: for a bias of that full shape the buffer is the
    gradient itself; a broadcast bias (e.g. [1, H, N, N] with B > 1) is reduced from it in
    torch, in float32, so it costs O(B·Hq·Nq·Nk) memory, only when the bias requires grad.
    A fused reduction would need atomics (nondeterministic) or one program per bias element
    looping over the broadcast dims.
    """
    B, Hq, Hkv, Nq, Nk = inp.batch, inp.heads_q, inp.heads_kv, inp.len_q, inp.len_k
    dev = inp.device
    dq, dk, dv = empty_in_layout(inp.q), empty_in_layout(inp.k), empty_in_layout(inp.v)
    ds = None
    sparse = B * Hq > 0 and Nq > 0 and Nk > 0 and mask_tiles.worth_it(inp)
    if bias_requires_grad:
        # The kernel writes every element (zeros where causal skipped a block), except the
        # tiles a mask lets it skip. In the bias's own dtype: for an unbroadcast bias this
        # buffer *is* dbias, with no extra pass.
        alloc = torch.zeros if sparse else torch.empty
        ds = alloc((B, Hq, Nq, Nk), dtype=inp.bias.dtype, device=dev)
    if B * Hq == 0 or Nq == 0 or Nk == 0:
        for t in (dq, dk, dv):
            t.zero_()
    else:
        q, k, v = _unit_last(inp.q), _unit_last(inp.k), _unit_last(inp.v)
        out, dout = _unit_last(out), _unit_last(dout)
        lse = lse.contiguous()
        unused = _unused(q, launch)
        bias, sb = _bias_args(inp, unused, launch)
        meta, sc = _common_meta(inp), _scalars(inp)
        G = Hq // Hkv
        seed_arg = seed if seed is not None else unused

        fused = fused_dq(inp, bias_requires_grad)
        # Never an input when unused either: the dK/dV autotuner restores DQAcc in place after
        # timing a config (`restore_value`), which would bump q's autograd version.
        dq_acc = torch.empty((B, Hq, Nq, inp.head_dim) if fused else (0,), dtype=torch.float32, device=dev)
        delta = torch.empty((B, Hq, Nq), dtype=torch.float32, device=dev)
        preprocess(out, dout, dlse, delta, dq_acc, inp.head_dim, launch)
        common = (
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *sb,
            dout.stride(0), dout.stride(1), dout.stride(2),
        )
        scalars = (
            Hq, G, Nq, Nk, sc["qk_scale"], sc["cap_scale"], inp.scale, sc["drop_threshold"], sc["drop_scale"],
            sc["N_BUCKET"],
        )
        tiles = mask_tiles.classify(inp, bias, sb, launch) if sparse else None
        meta.update(SPARSE=sparse, TILE=mask_tiles.TILE)
        joint = None if fused or sparse else _joint_configs(meta, sc, Nk, B * Hkv, dev)
        if joint is not None:
            (m1, n1, m2, n2), warps, stages = joint
            launch(_attn_bwd_joint)[(triton.cdiv(Nk, n1) + triton.cdiv(Nq, m2), B * Hq)](
                q, k, v, bias, seed_arg, dout, lse, delta, dk, dv, dq, ds if ds is not None else unused, unused,
                *common,
                dk.stride(0), dk.stride(1), dk.stride(2),
                dv.stride(0), dv.stride(1), dv.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2),
                *delta.stride(),
                *scalars, STORE_DS=ds is not None, BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2,
                num_warps=warps, num_stages=stages, **{k_: v_ for k_, v_ in meta.items() if k_ not in ("SPARSE", "TILE")},
            )
        else:
            grid_kv = lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
            tile_ptrs, tile_strides = _tile_args(tiles, False, unused)
            launch(_attn_bwd_dkdv)[grid_kv](
                q, k, v, bias, seed_arg, dout, lse, delta, dk, dv, dq_acc, *tile_ptrs, unused, unused,
                *common,
                dk.stride(0), dk.stride(1), dk.stride(2),
                dv.stride(0), dv.stride(1), dv.stride(2),
                *delta.stride(),
                *tile_strides,
                *scalars, VARLEN=False, FUSED_DQ=fused, **meta,
            )
            if fused:
                torch.mul(dq_acc, inp.scale, out=dq)
            else:
                grid_q = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
                tile_ptrs, tile_strides = _tile_args(tiles, True, unused)
                launch(_attn_bwd_dq)[grid_q](
                    q, k, v, bias, seed_arg, dout, lse, delta, dq, ds if ds is not None else unused, *tile_ptrs,
                    unused, unused,
                    *common,
                    dq.stride(0), dq.stride(1), dq.stride(2),
                    *delta.stride(),
                    *tile_strides,
                    *scalars, STORE_DS=ds is not None, VARLEN=False, **meta,
                )

    return dq, dk, dv, inp.bias_grad_from_scores(ds) if bias_requires_grad else None


# =============================================================================================
# Packed variable-length batches (flash_inductor/varlen.py): the same kernels with VARLEN
# =============================================================================================


def _packed_inputs(q, k, v, causal, scale, dropout_p, softcap) -> AttentionInputs:
    """[1, H, total, D] views of the packed tensors: the dense description the meta needs."""
    return AttentionInputs.from_op(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), None, causal, scale,
                                   dropout_p, softcap)


def _packed_meta(inp: AttentionInputs, max_q: int, max_k: int) -> tuple[dict, dict]:
    sc = _scalars(inp)
    sc["N_BUCKET"] = triton.next_power_of_2(max(max_q, max_k, 16))
    return dict(_common_meta(inp), SPARSE=False, TILE=mask_tiles.TILE, VARLEN=True), sc


def forward_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: int, scale: float, dropout_p: float,
                   seed, softcap: float = 0.0, launch=_direct):
    """Packed q [total_q, Hq, D], k/v [total_k, Hkv, D|Dv], offsets cu_q / cu_k [B+1]:
    (out [total_q, Hq, Dv], lse [total_q, Hq] float32). One program per (query block of the
    longest sequence, sequence · head); blocks past a sequence's end exit at once."""
    inp = _packed_inputs(q, k, v, causal, scale, dropout_p, softcap)
    B, Hq, Hkv = cu_q.numel() - 1, q.shape[1], k.shape[1]
    out = torch.empty((q.shape[0], Hq, v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], Hq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or B == 0:
        return out, lse
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    meta, sc = _packed_meta(inp, max_q, max_k)
    unused = _unused(q, launch)
    grid = lambda m: (triton.cdiv(max(max_q, 1), m["BLOCK_M"]), B * Hq)  # noqa: E731
    launch(_attn_fwd)[grid](
        q, k, v, unused, seed if seed is not None else unused, out, lse, unused, unused, cu_q, cu_k,
        0, q.stride(1), q.stride(0),
        0, k.stride(1), k.stride(0),
        0, v.stride(1), v.stride(0),
        0, 0, 0, 0,
        0, out.stride(1), out.stride(0),
        0, lse.stride(1), lse.stride(0),
        0, 0, 0, 0,
        Hq, Hq // Hkv, 0, 0,
        sc["qk_scale"], sc["cap_scale"], sc["drop_threshold"], sc["drop_scale"], sc["N_BUCKET"],
        **meta,
    )
    return out, lse


def backward_varlen(dout, dlse, q, k, v, cu_q, cu_k, max_q: int, max_k: int, seed, out, lse, causal: int,
                    scale: float, dropout_p: float, softcap: float = 0.0, launch=_direct):
    """(dq, dk, dv) for `forward_varlen`, deterministic (no atomics)."""
    inp = _packed_inputs(q, k, v, causal, scale, dropout_p, softcap)
    B, Hq, Hkv = cu_q.numel() - 1, q.shape[1], k.shape[1]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if B == 0 or q.shape[0] == 0 or k.shape[0] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    # delta = rowsum(dO ∘ O) - dlse, [total_q, Hq] like lse.
    delta = (out.float() * dout.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    delta = delta.contiguous()
    meta, sc = _packed_meta(inp, max_q, max_k)
    unused = _unused(q, launch)
    seed_arg = seed if seed is not None else unused
    common = (
        0, q.stride(1), q.stride(0),
        0, k.stride(1), k.stride(0),
        0, v.stride(1), v.stride(0),
        0, 0, 0, 0,
        0, dout.stride(1), dout.stride(0),
    )
    scalars = (Hq, Hq // Hkv, 0, 0, sc["qk_scale"], sc["cap_scale"], scale, sc["drop_threshold"], sc["drop_scale"],
               sc["N_BUCKET"])
    lse_strides = (0, lse.stride(1), lse.stride(0))
    launch(_attn_bwd_dkdv)[lambda m: (triton.cdiv(max(max_k, 1), m["BLOCK_N"]), B * Hkv)](
        q, k, v, unused, seed_arg, dout, lse, delta, dk, dv, torch.empty(0, dtype=torch.float32, device=q.device),
        unused, unused, cu_q, cu_k,
        *common,
        0, dk.stride(1), dk.stride(0),
        0, dv.stride(1), dv.stride(0),
        *lse_strides, 0, 0, 0, 0,
        *scalars, FUSED_DQ=False, **meta,
    )
    launch(_attn_bwd_dq)[lambda m: (triton.cdiv(max(max_q, 1), m["BLOCK_M"]), B * Hq)](
        q, k, v, unused, seed_arg, dout, lse, delta, dq, unused, unused, unused, cu_q, cu_k,
        *common,
        0, dq.stride(1), dq.stride(0),
        *lse_strides, 0, 0, 0, 0,
        *scalars, STORE_DS=False, **meta,
    )
    return dq, dk, dv
