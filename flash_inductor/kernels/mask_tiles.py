"""Which tiles of a mask-like bias the attention kernels may skip, and which need no bias read.

HuggingFace models hand attention a mask, not a learned bias: `where(keep, 0, finfo.min)`
(or a bool keep-mask) of shape [B, 1, Nq, Nk] or [B, 1, 1, Nk], which carries the padding and,
for decoders, the causal triangle too (the rewrite then sees causal=False). Read as a plain
bias, every tile costs a full block of work plus a bias load, so a padded causal LLaMA batch
runs at the cost of dense attention with a bias: twice the work of causal attention, more with
padding. This module reads the bias once per call and sorts its TILE × TILE tiles into three
kinds, as FlexAttention's BlockMask does, but found at run time from the tensor itself:

* skipped: every element is masked (False, or a float <= MASKED_BIAS, which the op's contract
  treats as -inf: flash_inductor/inputs.py), hidden by the causal flag, or past the sequence
  ends. Exact: those elements contribute exp(-inf) = 0 to the row and nothing to any gradient,
  whether or not the row has another key.
* full: every element of every real query row is 0 (float) or True (bool), visible, and inside
  the key sequence: the kernel neither loads the bias nor applies an element mask there.
* partial: the rest, computed as without this module.

The kernels take, per (batch, head, query tile), the list of partial key tiles and the list of
full key tiles (forward and dQ), and per key tile the lists of query tiles (dK/dV). Batch and
head dims of size 1 in the bias stay size 1 here (stride 0 in the kernels).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..inputs import MASKED_BIAS as _MASKED_BIAS
from ..inputs import AttentionInputs, Causal

MASKED_BIAS = tl.constexpr(_MASKED_BIAS)
# Every kernel block (BLOCK_M, BLOCK_N <= 128, powers of two) lies inside one tile.
TILE = 32 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 128
SETTING_ENV = "FLASH_INDUCTOR_MASK_TILES"

SKIP, PARTIAL, FULL = 0, 1, 2


@triton.jit
def _masked_and_clear(x, IS_BOOL: tl.constexpr):
    """(masked, clear) per element: False or <= MASKED_BIAS masks its key (the op's contract);
    True or exactly 0 leaves the score as it is."""
    if IS_BOOL:
        return x == 0, x != 0
    x = x.to(tl.float32)
    return x <= MASKED_BIAS, x == 0.0


@triton.jit
def _classify_tiles(
    Bias, State,
    stride_bb, stride_bh, stride_bm, stride_bn,
    Hb, Nq, Nk, shift,
    IS_BOOL: tl.constexpr, CAUSAL: tl.constexpr, TILE: tl.constexpr,
):
    """One program per (query tile, key tile, bias batch·head): that tile's kind."""
    mt = tl.program_id(0)
    nt = tl.program_id(1)
    bh = tl.program_id(2)
    MT = tl.num_programs(0)
    NT = tl.num_programs(1)
    b = (bh // Hb).to(tl.int64)
    h = (bh % Hb).to(tl.int64)
    offs_m = mt * TILE + tl.arange(0, TILE)
    offs_n = nt * TILE + tl.arange(0, TILE)
    real_row = offs_m[:, None] < Nq
    inside = offs_n[None, :] < Nk
    if CAUSAL:
        inside = inside & (offs_n[None, :] <= offs_m[:, None] + shift)
    visible = real_row & inside
    x = tl.load(
        Bias + b * stride_bb + h * stride_bh + offs_m[:, None].to(tl.int64) * stride_bm + offs_n[None, :] * stride_bn,
        mask=visible, other=0,
    )
    masked, clear = _masked_and_clear(x, IS_BOOL)
    n_live = tl.sum(tl.sum((visible & ~masked).to(tl.int32), 1), 0)
    # Rows past Nq are never stored: they do not stop a tile from being full.
    n_full = tl.sum(tl.sum((~real_row | (inside & clear)).to(tl.int32), 1), 0)
    state = tl.where(n_live == 0, 0, tl.where(n_full == TILE * TILE, 2, 1))
    tl.store(State + (bh.to(tl.int64) * MT + mt) * NT + nt, state.to(tl.int8))


@triton.jit
def _classify_shared_rows(
    Bias, State, stride_bb, stride_bh, stride_bn, Hb, MT, Nk,
    IS_BOOL: tl.constexpr, TILE: tl.constexpr,
):
    """`_classify_tiles` for a mask whose query rows are one row (a [B, 1, 1, Nk] padding mask)
    without a causal flag: a key tile's kind is then the same for every query tile (each has a
    real row), so one program per (key tile, bias batch·head) reads TILE entries, not TILE²,
    and stores the kind for every query tile. The 2-D read took 354 µs a call at B=16, N=6912
    (H100, benchmarks/padding_profile.py)."""
    nt = tl.program_id(0)
    bh = tl.program_id(1)
    NT = tl.num_programs(0)
    b = (bh // Hb).to(tl.int64)
    h = (bh % Hb).to(tl.int64)
    offs_n = nt * TILE + tl.arange(0, TILE)
    inside = offs_n < Nk
    x = tl.load(Bias + b * stride_bb + h * stride_bh + offs_n * stride_bn, mask=inside, other=0)
    masked, clear = _masked_and_clear(x, IS_BOOL)
    n_live = tl.sum((inside & ~masked).to(tl.int32), 0)
    n_full = tl.sum((inside & clear).to(tl.int32), 0)
    state = tl.where(n_live == 0, 0, tl.where(n_full == TILE, 2, 1)).to(tl.int8)
    for mt in range(0, MT):
        tl.store(State + (bh.to(tl.int64) * MT + mt) * NT + nt, state)


@triton.jit
def _build_lists(
    State, Counts, Tiles, ROWS, ROW_LEN, stride_row, stride_col, list_stride,
    BLOCK: tl.constexpr,
):
    """One program per map row (a query tile's key tiles, or a key tile's query tiles): the
    partial and the full tiles of the row, in ascending order, and how many of each."""
    r = tl.program_id(0)
    bh = r // ROWS
    i = r % ROWS
    offs = tl.arange(0, BLOCK)
    st = tl.load(State + bh.to(tl.int64) * ROWS * ROW_LEN + i * stride_row + offs * stride_col,
                 mask=offs < ROW_LEN, other=0)
    for kind in tl.static_range(2):
        hit = (st == kind + 1) & (offs < ROW_LEN)
        pos = tl.cumsum(hit.to(tl.int32), 0) - 1
        row = kind * list_stride + r
        tl.store(Tiles + row.to(tl.int64) * ROW_LEN + pos, offs, mask=hit)
        tl.store(Counts + row, tl.sum(hit.to(tl.int32), 0))


@dataclass
class MaskTiles:
    """Tile lists for the kernels: `by_query` for forward/dQ, `by_key` for dK/dV.

    counts [2, Bb, Hb, rows] int32 (partial, full) and tiles [2, Bb, Hb, rows, cols] int32 (the
    first count entries of each row, ascending); stride_b / stride_h step one batch / head in
    units of rows (0 where the bias is broadcast); list_stride steps from partial to full.
    """

    counts_q: torch.Tensor
    tiles_q: torch.Tensor
    counts_k: torch.Tensor | None  # None when built for the forward only
    tiles_k: torch.Tensor | None
    bb: int
    hb: int
    mt: int
    nt: int

    def query_args(self) -> tuple:
        """(counts, tiles, stride_b, stride_h, list_stride, row length) for forward / dQ."""
        rows = self.mt
        return (self.counts_q, self.tiles_q, self.hb * rows if self.bb > 1 else 0, rows if self.hb > 1 else 0,
                self.bb * self.hb * rows, self.nt)

    def key_args(self) -> tuple:
        rows = self.nt
        return (self.counts_k, self.tiles_k, self.hb * rows if self.bb > 1 else 0, rows if self.hb > 1 else 0,
                self.bb * self.hb * rows, self.mt)


def enabled() -> bool:
    return os.environ.get(SETTING_ENV, "1").strip() != "0"


# The map costs two launches before the forward kernel and three before the backward's (plus a
# read of the mask): on the lent H200 hosts, where a compiled BERT-base forward is host-bound
# (host 5.45 ms against 1.99 ms of kernels, benchmarks/e2e_models.py's breakdown), each launch
# costs more host time than a small kernel takes. Below this much forward work (4·B·H·Nq·Nk·D
# FLOPs; ~40 µs at 400 TFLOP/s) the dense loops read the mask instead: exact either way, and the
# skippable work there is worth less than the launches. BERT-base at 8 × 512 does 6.4 GFLOP per
# layer, a LLaMA-style layer at 4096 tokens 137.
MIN_FLOPS = 16e9


def mask_like(inp: AttentionInputs) -> bool:
    """A mask, not a learned bias: bool, or float shared by every head (a learned per-head bias
    such as T5's or ALiBi has nothing to skip, and classifying it would cost a read of all of
    it); and more than one key tile."""
    if inp.bias is None or not enabled() or inp.len_k <= TILE:
        return False
    b4 = inp.bias_4d()
    return inp.bias_kind == "bool" or b4.shape[1] == 1 or inp.heads_q == 1


def worth_it(inp: AttentionInputs) -> bool:
    """Classify this call's mask: mask-like, and enough work that skipping can repay the map."""
    flops = 4 * inp.batch * inp.heads_q * inp.len_q * inp.len_k * inp.head_dim
    return mask_like(inp) and flops >= MIN_FLOPS


# Inside one trace (kernels_in_graph.py: one AOTAutograd graph, forward and backward), every
# layer of a model passes the same mask tensor, and each call would classify it again: in GPT-2
# medium's training step the map was 96 of its launches and 378 µs (RESULTS.md, session 12).
# Inductor cannot merge those launches (each writes a fresh buffer), so the trace shares them:
# a call finds the map and lists an earlier call of the same trace built from the same tensor
# (same object, same version, same shape, lengths and causal flag) and uses them as graph values.
_shared_memo: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mask_tiles_shared", default=None)


@contextlib.contextmanager
def shared_in_trace(memo: dict):
    """Calls classified inside this context share their maps through `memo` (one per trace)."""
    token = _shared_memo.set(memo)
    try:
        yield
    finally:
        _shared_memo.reset(token)


def classify(inp: AttentionInputs, bias4: torch.Tensor, strides: tuple, launch, by_key: bool = True) -> MaskTiles:
    """Read the bias once and build the tile lists. `bias4` / `strides` as the kernels get them.
    `by_key=False` (the forward) skips the dK/dV lists: one launch and two buffers fewer."""
    memo = _shared_memo.get()
    key = None
    if memo is not None:
        key = (id(inp.bias), inp.bias._version, tuple(bias4.shape), tuple(strides), inp.len_q, inp.len_k,
               int(inp.causal), inp.bias_kind)
        entry = memo.get(key)
        if entry is not None and (entry["tiles"].counts_k is not None or not by_key):
            return entry["tiles"]
    b4 = inp.bias_4d()
    bb, hb = b4.shape[0], b4.shape[1]
    nq, nk = inp.len_q, inp.len_k
    mt, nt = triton.cdiv(nq, TILE), triton.cdiv(nk, TILE)
    dev = inp.device
    if key is not None and key in memo:
        state, lists = memo[key]["state"], [memo[key]["tiles"].counts_q, memo[key]["tiles"].tiles_q]
    else:
        state = torch.empty((bb, hb, mt, nt), dtype=torch.int8, device=dev)
        shift = nk - nq if inp.causal == Causal.BOTTOM_RIGHT else 0
        if strides[2] == 0 and inp.causal == Causal.NONE:
            launch(_classify_shared_rows)[(nt, bb * hb)](
                bias4, state, strides[0], strides[1], strides[3], hb, mt, nk,
                IS_BOOL=inp.bias_kind == "bool", TILE=TILE,
            )
        else:
            launch(_classify_tiles)[(mt, nt, bb * hb)](
                bias4, state, *strides, hb, nq, nk, shift,
                IS_BOOL=inp.bias_kind == "bool", CAUSAL=inp.causal != Causal.NONE, TILE=TILE,
            )
        lists = []
    # By query tile (rows of the map), then by key tile (its columns).
    for rows, row_len, stride_row, stride_col in ((mt, nt, nt, 1), (nt, mt, 1, nt))[len(lists) // 2: 2 if by_key else 1]:
        counts = torch.empty((2, bb, hb, rows), dtype=torch.int32, device=dev)
        tiles = torch.empty((2, bb, hb, rows, row_len), dtype=torch.int32, device=dev)
        launch(_build_lists)[(bb * hb * rows,)](
            state, counts, tiles, rows, row_len, stride_row, stride_col, bb * hb * rows,
            BLOCK=triton.next_power_of_2(row_len),
        )
        lists += [counts, tiles]
    if not by_key:
        lists += [None, None]
    result = MaskTiles(*lists, bb, hb, mt, nt)
    if key is not None:
        # The bias is held so that its id cannot be reused by another tensor while the memo lives.
        memo[key] = {"bias": inp.bias, "state": state, "tiles": result}
    return result
