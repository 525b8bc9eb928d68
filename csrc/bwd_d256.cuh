// Hopper (sm_90a) backward at head dim 256: our own kernel on CuTe's TMA and wgmma atoms.
//
// Why not example 88's backward collective (csrc/bwd_kernel.cuh) as at head dims 64 and 128: its
// CTA holds 128 keys of K and V plus two stages of Q and dO and a float32 dQ tile in shared
// memory (272 KB at head dim 256 against the 227 KB an sm_90 block has), and each consumer
// warpgroup keeps dK and dV of its 64 keys over the whole head dim in registers (256 registers a
// thread for the accumulators alone).
//
// So here a CTA owns 64 keys and walks the query blocks of 64 rows; its two warpgroups split the
// work two ways:
//   S = Q Kᵀ and dP = dO Vᵀ (64 rows x 64 keys): warpgroup w takes keys [32 w, 32 w + 32);
//   P = exp2(S scale log2(e) - lse), dS = P (dP - delta) scale go to shared memory (bf16/fp16);
//   dV += Pᵀ dO and dK += dSᵀ Q (64 keys x 256 dims): warpgroup w takes dims [128 w, 128 w + 128),
//     so each thread holds 64 + 64 accumulator registers;
//   dQ = dS K: warpgroup w computes dims [128 w, 128 w + 128) in two 64-dim chunks; each goes
//     through the warpgroup's 8 KB shared-memory buffer, 32 dims at a time, into the float32
//     accumulator by TMA reduce-add.
// Shared memory: K, V (32 KB each), two stages of Q and dO (128 KB), P and dS (8 KB each), the
// two dQ buffers (16 KB): 225 KB of the 227.
// Every thread computes: one thread issues the TMA loads of the next query block's Q and dO
// while the CTA works on the current one; lse and delta go through shared memory.
//
// What bounds it: dQ's adds. Every 64-key CTA adds a float32 partial of every query row's dQ, so
// the L2 reductions are twice those of the 128-key blocks at head dims 64 and 128: without them
// (a probe below) this backward runs 390 TFLOP/s at N=8192 against 235 with them, and 8-byte
// atomics from registers measured the same as the TMA reduce (session 26). Halving them needs
// 128 keys per reduction: two CTAs of a cluster summing their partials in shared memory (DSMEM)
// before one reduce (benchmarks/NOTES.md).
//
// Rows past len_q get lse = +inf and delta = 0 (P = 0: they add nothing); keys past len_k load
// as zeros (TMA fills), so their dS meets zero K rows in dQ, and their dK/dV are not stored.
// Masks are applied only to the blocks that cross the diagonal; blocks no row of which sees a
// key of this CTA are skipped (the loads too).
//
// The forward's bias (kBias 1) is read from global memory into registers, a thread's own 16
// scores as 8 pairs of adjacent keys (32-bit loads; four threads read a row's 16 contiguous
// bytes), one query block ahead: the loads of block m + 1 are issued after block m's softmax and
// consumed in the next one, a whole iteration later. (Shared memory has no room for a bias tile;
// and loaded after the S GEMM, as session 22 first tried at head dim 128, they cost a DRAM round
// trip inside every block.) Its gradient (kBias 2) is dS before the scale, stored from registers
// in the same pairs; the blocks the mask skips get zeros, as the contract says
// (FlashCutlassBwdParams.dbias).
//
// Dropout (kDropout) redraws the forward's keep bits (dropout_philox.h) on this thread's own
// scores: in S's accumulator a thread holds, per row, the 8 keys of a 32-key span that one
// Philox call covers (the forward's layout: fwd_dropout.cuh), so two calls a block, issued while
// the S and dP GEMMs run on the tensor cores. lse and delta come with 1 / (1 - p) folded in
// (FlashCutlassBwdParams), so dS = P' (keep dP - delta') and dV sums keep P'.
//
// One instantiation per translation unit (flash_inductor/cutlass_build.py, families
// hopper_bwd_d256 and hopper_bwd_dropout_d256).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>

#include "cutlass/cutlass.h"
#include "cutlass/arch/barrier.h"
#include "cute/tensor.hpp"
#include "cute/atom/copy_atom.hpp"
#include "cute/atom/copy_traits_sm90_tma.hpp"
#include "cute/atom/mma_atom.hpp"
#include "collective/fmha_common.hpp"

#include "dropout_philox.h"
#include "element_bits.cuh"
#include "flash_cutlass_bwd.h"
#include "launch.cuh"

namespace flash_cutlass {
namespace d256 {

using namespace cute;
using cutlass::fmha::collective::gemm_zero_acc;

constexpr int kRows = 64;   // query rows per block
constexpr int kKeys = 64;   // keys per CTA
constexpr int kDim = 256;
constexpr int kThreads = 256;  // two warpgroups
constexpr int kTileElems = kRows * kDim;
constexpr int kDqCols = 32;  // dims per dQ buffer: one 128-byte swizzled row of floats

// How dQ reaches its float32 accumulator. 0: the TMA reduce-add of a shared-memory buffer per
// warpgroup (64 rows x 32 dims, 128-byte swizzle): full 128-byte lines, issued by one thread.
// 1: 8-byte atomics from the accumulator's registers, each chunk's while the next GEMM runs. The
// two measured the same (235 / 226 against 230 / 230 TFLOP/s, no mask / causal, N=8192, session
// 26; benchmarks/cutlass_bwd_time.py --variant times them). Also tried and dropped: warpgroup 0
// computing S and dV, warpgroup 1 dP and dK (wider GEMMs, but P crosses shared memory before
// dS: 205 TFLOP/s against 224).
#ifndef FLASH_CUTLASS_D256_DQ_ATOMICS
#define FLASH_CUTLASS_D256_DQ_ATOMICS 0
#endif
// A measurement probe, never built by a library: dQ is computed but not added (wrong dQ), so a
// timing shows what the adds cost.
#ifndef FLASH_CUTLASS_D256_PROBE_NO_DQ
#define FLASH_CUTLASS_D256_PROBE_NO_DQ 0
#endif

template <class Element>
struct Layouts {
  // 8 rows x 64 elements, 128-byte swizzle, the contiguous dim last (K-major for a GEMM that
  // reduces over it). tile_to_shape steps down the rows first, so dims [64 j, 64 j + 64) of a
  // tile are one contiguous block of rows x 64 elements: a sub-range of dims is itself a
  // canonical tile at a pointer offset (what the half- and quarter-dim operands below use).
  using Atom = GMMA::Layout_K_SW128_Atom<Element>;
  using Tile = decltype(tile_to_shape(Atom{}, Shape<Int<kRows>, Int<kDim>>{}));            // (row, dim)
  using Staged = decltype(tile_to_shape(Atom{}, Shape<Int<kRows>, Int<kDim>, _2>{}));      // Q, dO
  using Single = decltype(tile_to_shape(Atom{}, Shape<Int<kKeys>, Int<kDim>, _1>{}));      // K, V
  using Half = decltype(tile_to_shape(Atom{}, Shape<Int<kRows>, Int<kDim / 2>>{}));
  using Quarter = decltype(tile_to_shape(Atom{}, Shape<Int<kRows>, Int<kDim / 4>>{}));     // also P, dS
  static_assert(kRows == kKeys, "Half and Quarter serve K's rows as well as Q's");
};

// The (column, row) view of a (row, column) layout: the MN-major operand of a GEMM that reduces
// over the rows (the same shared memory, read transposed by wgmma).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto transposed(Layout const& l) {
  return composition(l, make_layout(make_shape(size<1>(l), size<0>(l)), make_stride(size<0>(l), _1{})));
}

template <class Element>
struct SharedStorage {
  alignas(1024) cute::array_aligned<Element, 2 * kTileElems> q;
  alignas(1024) cute::array_aligned<Element, 2 * kTileElems> dout;
  alignas(1024) cute::array_aligned<Element, kKeys * kDim> k;
  alignas(1024) cute::array_aligned<Element, kKeys * kDim> v;
  alignas(1024) cute::array_aligned<Element, kRows * kKeys> p;
  alignas(1024) cute::array_aligned<Element, kRows * kKeys> ds;
  alignas(1024) cute::array_aligned<float, 2 * kRows * kDqCols> dq;  // a buffer per warpgroup
  float lse[2][kRows];
  float delta[2][kRows];
  alignas(8) uint64_t bar_kv;
  uint64_t bar_q[2];
};

// Masks, as seen from key block n (keys [64 n, 64 n + 64)): row r sees key k iff
// k <= visible(r). first / next give the query blocks that see some key of the block.
struct NoMask {
  static constexpr bool kCausal = false;
  CUTE_DEVICE static int visible(int, int, int) { return INT32_MAX; }
  CUTE_DEVICE static int first(int, int, int) { return 0; }
  CUTE_DEVICE static int next(int m, int, int, int) { return m + 1; }
};

struct TopLeft {
  static constexpr bool kCausal = true;
  CUTE_DEVICE static int visible(int row, int, int) { return row; }
  CUTE_DEVICE static int first(int n, int, int) { return n; }
  CUTE_DEVICE static int next(int m, int, int, int) { return m + 1; }
};

// len_q <= len_k (the caller checks): row r sees k <= r + len_k - len_q.
struct BottomRight {
  static constexpr bool kCausal = true;
  CUTE_DEVICE static int visible(int row, int len_q, int len_k) { return row + len_k - len_q; }
  CUTE_DEVICE static int first(int n, int len_q, int len_k) {
    int x = n * kKeys - (len_k - len_q);  // the first row that sees key 64 n
    return x > 0 ? x / kRows : 0;
  }
  CUTE_DEVICE static int next(int m, int, int, int) { return m + 1; }
};

// Grouped KV heads folded into rows (row = g * len_k + position, len_k a multiple of 64 so a
// block stays in one query head): top-left on the position. In each head the blocks from
// position 64 n on see the key block.
struct Folded {
  static constexpr bool kCausal = true;
  CUTE_DEVICE static int visible(int row, int, int len_k) { return row % len_k; }
  CUTE_DEVICE static int first(int n, int, int) { return n; }
  CUTE_DEVICE static int next(int m, int n, int, int len_k) {
    int m1 = m + 1;
    return m1 % (len_k / kRows) == 0 ? m1 + n : m1;
  }
};

template <int kMask>
using MaskFor = std::conditional_t<
    kMask == FLASH_CUTLASS_CAUSAL_TOP_LEFT, TopLeft,
    std::conditional_t<kMask == FLASH_CUTLASS_CAUSAL_BOTTOM_RIGHT, BottomRight,
                       std::conditional_t<kMask == FLASH_CUTLASS_CAUSAL_FOLDED, Folded, NoMask>>>;

template <class Element>
struct Kernel {
  using L = Layouts<Element>;
  // (row, dim, head, batch) in global memory, the dim contiguous.
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                          make_shape(int(), Int<kDim>{}, int(), int()),
                                          make_stride(int(), _1{}, int(), int())));
  using Tma = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GmemTensor>(), typename L::Tile{}));

  // S and dP: the 64 keys split over the two warpgroups (32 each).
  using MmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kRows>, Int<kKeys / 2>, Int<kDim>>>(),
      Layout<Shape<_1, _2, _1>>{}));
  // dV += Pᵀ dO and dK += dSᵀ Q per warpgroup: (64 keys, 128 dims, 64 rows), both operands
  // read transposed.
  using MmaKV = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kKeys>, Int<kDim / 2>, Int<kRows>>,
                           GMMA::Major::MN, GMMA::Major::MN>()));
  // dQ = dS K per warpgroup and chunk: (64 rows, 64 dims, 64 keys), K read transposed.
  using MmaQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kRows>, Int<kDim / 4>, Int<kKeys>>,
                           GMMA::Major::K, GMMA::Major::MN>()));

  // dQ's buffer (row, dim) and its TMA reduce-add into the (row, dim, head, batch) accumulator.
  using DqSmem = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<float>{}, Shape<Int<kRows>, Int<kDqCols>>{}));
  using GmemDq = decltype(make_tensor(make_gmem_ptr(static_cast<float*>(nullptr)),
                                      make_shape(int(), Int<kDim>{}, int(), int()),
                                      make_stride(Int<kDim>{}, _1{}, int(), int())));
  using TmaDq = decltype(make_tma_copy(SM90_TMA_REDUCE_ADD{}, std::declval<GmemDq>(), DqSmem{}));

  struct Params {
    Tma tma_q, tma_k, tma_v, tma_do;
    TmaDq tma_dq;
    Element* dk;
    Element* dv;
    float* dq_acc;
    float const* lse;
    float const* delta;
    int64_t dk_stride[3], dv_stride[3];  // batch, head, row (elements)
    int batch, heads, len_q, len_k;
    float scale, scale_log2;
    // The bias and its gradient, [batch, query heads, rows_per_head, len_k] through strides of
    // batch, query head and row (elements; 0 on broadcast dims): grouped KV heads folded into rows
    // (row r of KV head h: query head h * groups + r / rows_per_head, row r % rows_per_head).
    uint16_t const* bias;
    int64_t bias_stride[3];
    uint16_t* dbias;
    int64_t dbias_stride[3];
    int groups, rows_per_head;
    // Dropout: the op's seed tensor (Philox key, offset) and round(p * 2^16).
    int64_t const* seed;
    uint32_t drop_threshold;
  };
};

// A folded row's query head and its row in that head (grouped KV heads: FlashCutlassBwdParams).
template <class Params>
CUTE_DEVICE int2 query_head_and_row(Params const& p, int kv_head, int row) {
  if (p.groups == 1) return make_int2(kv_head, row);
  return make_int2(kv_head * p.groups + row / p.rows_per_head, row % p.rows_per_head);
}

// kBias: 0 none, 1 the forward's bias read, 2 that and its gradient written. kDropout: the
// forward's keep bits redrawn and applied to P and dP.
template <class Element, class Mask, int kBias, bool kDropout>
__global__ void __launch_bounds__(kThreads, 1) bwd_kernel(CUTE_GRID_CONSTANT typename Kernel<Element>::Params const p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using K = Kernel<Element>;
  using L = typename K::L;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr uint32_t kTileBytes = kTileElems * sizeof(Element);

  extern __shared__ char smem_raw[];
  // The swizzle is a function of the address: every buffer starts on a 1024-byte boundary.
  auto& s = *reinterpret_cast<SharedStorage<Element>*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  int const n_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  int const tid = threadIdx.x, wg_tid = tid % cutlass::NumThreadsPerWarpGroup;
  // Warp-uniform for the compiler (a branch on it holds wgmma without serialising them).
  int const wg = __shfl_sync(0xffffffff, tid / cutlass::NumThreadsPerWarpGroup, 0);
  int const len_q = p.len_q, len_k = p.len_k;
  int const num_m = (len_q + kRows - 1) / kRows;
  int64_t const bh = int64_t(batch) * p.heads + head;

  if (tid == 0) {
    Barrier::init(&s.bar_kv, 1);
    Barrier::init(&s.bar_q[0], 1);
    Barrier::init(&s.bar_q[1], 1);
    cutlass::arch::fence_barrier_init();
  }

  // TMA views: (tile, block) in global memory, (tile, stage) in shared memory.
  auto gmem_shape = make_shape(len_q, Int<kDim>{}, p.heads, p.batch);
  auto kv_shape = make_shape(len_k, Int<kDim>{}, p.heads, p.batch);
  auto tile = Shape<Int<kRows>, Int<kDim>>{};
  Tensor gQ = local_tile(p.tma_q.get_tma_tensor(gmem_shape)(_, _, head, batch), tile, make_coord(_, _0{}));
  Tensor gDO = local_tile(p.tma_do.get_tma_tensor(gmem_shape)(_, _, head, batch), tile, make_coord(_, _0{}));
  Tensor gK = local_tile(p.tma_k.get_tma_tensor(kv_shape)(_, _, head, batch), tile, make_coord(_, _0{}));
  Tensor gV = local_tile(p.tma_v.get_tma_tensor(kv_shape)(_, _, head, batch), tile, make_coord(_, _0{}));
  Tensor sQ = make_tensor(make_smem_ptr(s.q.data()), typename L::Staged{});
  Tensor sDO = make_tensor(make_smem_ptr(s.dout.data()), typename L::Staged{});
  Tensor sK = make_tensor(make_smem_ptr(s.k.data()), typename L::Single{});
  Tensor sV = make_tensor(make_smem_ptr(s.v.data()), typename L::Single{});
  auto [tQgQ, tQsQ] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
  auto [tDgD, tDsD] = tma_partition(p.tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sDO), group_modes<0, 2>(gDO));
  auto [tKgK, tKsK] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
  auto [tVgV, tVsV] = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

  // A block's lse (times log2(e)) and delta into shared memory: +inf and 0 past len_q.
  auto load_stats = [&](int m, int stage) {
    if (tid < kRows) {
      int row = m * kRows + tid;
      bool in = row < len_q;
      s.lse[stage][tid] = in ? p.lse[bh * len_q + row] : INFINITY;
      s.delta[stage][tid] = in ? p.delta[bh * len_q + row] : 0.f;
    }
  };
  auto load_block = [&](int m, int stage) {
    Barrier::arrive_and_expect_tx(&s.bar_q[stage], 2 * kTileBytes);
    copy(p.tma_q.with(s.bar_q[stage]), tQgQ(_, m), tQsQ(_, stage));
    copy(p.tma_do.with(s.bar_q[stage]), tDgD(_, m), tDsD(_, stage));
  };

  int m = Mask::first(n_block, len_q, len_k);
  __syncthreads();  // the barriers' init
  if (tid == 0) {
    Barrier::arrive_and_expect_tx(&s.bar_kv, 2 * kTileBytes);
    copy(p.tma_k.with(s.bar_kv), tKgK(_, n_block), tKsK(_, 0));
    copy(p.tma_v.with(s.bar_kv), tVgV(_, n_block), tVsV(_, 0));
    if (m < num_m) load_block(m, 0);
  }
  if (m < num_m) load_stats(m, 0);

  // S = Q Kᵀ and dP = dO Vᵀ: one tiled MMA over both warpgroups, 32 keys each.
  typename K::MmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  Tensor tSrQ = thr_sdp.make_fragment_A(thr_sdp.partition_A(sQ));    // (mma, m, k, stage)
  Tensor tSrDO = thr_sdp.make_fragment_A(thr_sdp.partition_A(sDO));
  Tensor tSrK = thr_sdp.make_fragment_B(thr_sdp.partition_B(sK(_, _, 0)));  // (mma, n, k)
  Tensor tSrV = thr_sdp.make_fragment_B(thr_sdp.partition_B(sV(_, _, 0)));
  Tensor accS = partition_fragment_C(mma_sdp, Shape<Int<kRows>, Int<kKeys>>{});
  Tensor accDP = partition_fragment_C(mma_sdp, Shape<Int<kRows>, Int<kKeys>>{});
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kKeys>>{}));  // (row, key)
  Tensor sDS = make_tensor(make_smem_ptr(s.ds.data()), typename L::Quarter{});   // (row, key)
  // This thread's places in P and dS, made anew in each iteration from an opaque pointer: each
  // is a swizzled address per score, which the compiler would otherwise keep in registers for
  // the whole loop (32 of them; with 64 scores a thread, a schedule tried in session 26 spilled).
  auto score_places = [&](Element* buffer) {
    asm volatile("" : "+l"(buffer));
    return thr_sdp.partition_C(make_tensor(make_smem_ptr(buffer), typename L::Quarter{}));
  };

  // This thread's scores in S's wgmma accumulator: score i = e + 2 h + 4 j is row r_lo + 8 h of
  // the block and key k_lo + 8 j + e of this CTA (r_lo = 16 (warp % 4) + lane / 4, k_lo = 32 wg +
  // 2 (lane % 4)): 2 rows x 8 keys, as pairs of adjacent keys (pair i / 2 = h + 2 j).
  static_assert(decltype(size(accS))::value == 16, "a thread's scores: 2 rows x 4 pairs of keys");
  int const r_lo = get<0>(tScS(0)), k_lo = get<1>(tScS(0));
  int const first_key = n_block * kKeys;

  // kBias: this thread's 8 pairs of the bias of block m_block (0 past len_q or len_k: those
  // scores are never used), into bias_pairs for that block's softmax.
  uint32_t bias_pairs[8];
  auto load_bias = [&](int m_block) {
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; h++) {
      int row = m_block * kRows + r_lo + 8 * h;
      int2 hr = query_head_and_row(p, head, row);
      uint16_t const* src = p.bias + batch * p.bias_stride[0] + hr.x * p.bias_stride[1] + hr.y * p.bias_stride[2] +
                            first_key + k_lo;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < 4; j++) {
        int key = first_key + k_lo + 8 * j;
        uint32_t bits = 0;
        if (row < len_q && key + 1 < len_k) {
          bits = __ldg(reinterpret_cast<unsigned int const*>(src + 8 * j));
        } else if (row < len_q && key < len_k) {
          bits = __ldg(reinterpret_cast<unsigned short const*>(src + 8 * j));
        }
        bias_pairs[h + 2 * j] = bits;
      }
    }
  };
  if constexpr (bool(kBias)) {
    if (m < num_m) load_bias(m);
  }

  // kBias 2: zeros for the bias gradient of query block m_block, a block the mask skips (this
  // CTA's 64 keys; every thread 32 bytes of a row), nothing past len_q or len_k.
  auto zero_grad_block = [&](int m_block) {
    int row = m_block * kRows + tid / 4, key = first_key + (tid % 4) * 16;
    if (row >= len_q) return;
    int2 hr = query_head_and_row(p, head, row);
    uint16_t* dst = p.dbias + batch * p.dbias_stride[0] + hr.x * p.dbias_stride[1] + hr.y * p.dbias_stride[2] + key;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < 2; c++) {
      if (key + 8 * c + 8 <= len_k) {
        *reinterpret_cast<uint4*>(dst + 8 * c) = make_uint4(0u, 0u, 0u, 0u);
      } else {
        for (int e = 0; key + 8 * c + e < len_k; e++) dst[8 * c + e] = 0;
      }
    }
  };
  if constexpr (kBias == 2 && Mask::kCausal) {
    // The blocks before the first one this CTA visits, and those its walk steps over.
    int visit = m;
    for (int mz = 0; mz < num_m; mz++) {
      if (mz == visit) {
        visit = Mask::next(visit, n_block, len_q, len_k);
      } else {
        zero_grad_block(mz);
      }
    }
  }

  // kDropout: the seed's words; the keep bits of block m_block's scores (bit i: score i kept), one
  // Philox call per row for this thread's 32-key span (keys 32 a + 8 w + 2 c + e of it: word w,
  // half e, of the call for group 4 a + c).
  uint64_t drop_seed = 0;
  uint32_t drop_offset = 0;
  if constexpr (kDropout) {
    drop_seed = uint64_t(p.seed[0]);
    drop_offset = flash_dropout::fold_offset(p.seed[1]);
  }
  auto draw_keep = [&](int m_block) {
    uint32_t keep = 0;
    uint32_t const group = 4u * (uint32_t(first_key + k_lo) / 32u) + uint32_t(k_lo % 8) / 2u;  // 4 a + c
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; h++) {
      int2 hr = query_head_and_row(p, head, m_block * kRows + r_lo + 8 * h);
      uint32_t bh = uint32_t(batch * p.heads * p.groups + hr.x);
      flash_dropout::Words r = flash_dropout::philox(drop_seed, group, uint32_t(hr.y), bh, drop_offset);
      CUTLASS_PRAGMA_UNROLL
      for (int w = 0; w < 4; w++) {
        keep |= uint32_t((r.w[w] & 0xFFFFu) >= p.drop_threshold) << (2 * h + 4 * w);
        keep |= uint32_t((r.w[w] >> 16) >= p.drop_threshold) << (2 * h + 4 * w + 1);
      }
    }
    return keep;
  };

  // dV += Pᵀ dO and dK += dSᵀ Q for this warpgroup's 128 dims; B is a stage's half tile of dO / Q.
  typename K::MmaKV mma_kv;
  auto thr_kv = mma_kv.get_thread_slice(wg_tid);
  Tensor tVrPt = thr_kv.make_fragment_A(thr_kv.partition_A(make_tensor(make_smem_ptr(s.p.data()), transposed(typename L::Quarter{}))));
  Tensor tKrDSt = thr_kv.make_fragment_A(thr_kv.partition_A(make_tensor(make_smem_ptr(s.ds.data()), transposed(typename L::Quarter{}))));
  auto half_operand = [&](Element* tile_base) {
    return thr_kv.make_fragment_B(thr_kv.partition_B(
        make_tensor(make_smem_ptr(tile_base + wg * (kTileElems / 2)), transposed(typename L::Half{}))));
  };
  auto tVrDO0 = half_operand(s.dout.data()), tVrDO1 = half_operand(s.dout.data() + kTileElems);
  auto tKrQ0 = half_operand(s.q.data()), tKrQ1 = half_operand(s.q.data() + kTileElems);
  Tensor accDV = partition_fragment_C(mma_kv, Shape<Int<kKeys>, Int<kDim / 2>>{});
  Tensor accDK = partition_fragment_C(mma_kv, Shape<Int<kKeys>, Int<kDim / 2>>{});
  clear(accDV);
  clear(accDK);
  mma_kv.accumulate_ = GMMA::ScaleOut::One;

  // dQ: this warpgroup's two 64-dim chunks of K (dims [128 wg + 64 c, + 64)).
  typename K::MmaQ mma_q;
  auto thr_q = mma_q.get_thread_slice(wg_tid);
  Tensor tQrDS = thr_q.make_fragment_A(thr_q.partition_A(sDS));
  auto k_chunk = [&](int c) {
    return thr_q.make_fragment_B(thr_q.partition_B(make_tensor(
        make_smem_ptr(s.k.data() + (2 * wg + c) * (kTileElems / 4)), transposed(typename L::Quarter{}))));
  };
  auto tQrK0 = k_chunk(0), tQrK1 = k_chunk(1);
  Tensor accDQ = partition_fragment_C(mma_q, Shape<Int<kRows>, Int<kDim / 4>>{});
  Tensor tQcQ = thr_q.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kDim / 4>>{}));  // (row, dim)

  // The TMA reduce-add of a buffer: (64 rows, 32 dims) blocks of the accumulator.
  Tensor gDQ = local_tile(p.tma_dq.get_tma_tensor(gmem_shape)(_, _, head, batch), Shape<Int<kRows>, Int<kDqCols>>{},
                          make_coord(_, _));  // (row, dim, m, dim block)
  float* dq_buf = s.dq.data() + wg * (kRows * kDqCols);
  auto dq_tma = p.tma_dq.get_slice(_0{});
  Tensor tDQsDQ = dq_tma.partition_S(make_tensor(make_smem_ptr(dq_buf), typename K::DqSmem{}));
  Tensor tDQgDQ = dq_tma.partition_D(gDQ);
  // This warpgroup's named barrier (ids 1, 2; 0 is __syncthreads), with a memory clobber so the
  // compiler keeps shared-memory accesses on their side.
  auto wg_sync = [&] { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); };

  // Adds the dQ chunk in accDQ (rows of block m_block, dims [128 wg + 64 chunk, + 64)). A
  // thread's values come in pairs of adjacent dims (the wgmma accumulator's layout), its first
  // half of them in dims [0, 32) of the chunk.
  auto add_dq = [&](int m_block, int chunk) {
    if constexpr (FLASH_CUTLASS_D256_PROBE_NO_DQ) return;
    if constexpr (FLASH_CUTLASS_D256_DQ_ATOMICS) {
      float* base = p.dq_acc + (bh * len_q + int64_t(m_block) * kRows) * kDim + (2 * wg + chunk) * (kDim / 4);
      int rows_left = len_q - m_block * kRows;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(accDQ); i += 2) {
        int r = get<0>(tQcQ(i)), c = get<1>(tQcQ(i));
        if (r < rows_left) atomicAdd(reinterpret_cast<float2*>(base + r * kDim + c), make_float2(accDQ(i), accDQ(i + 1)));
      }
    } else {
      constexpr int kHalf = size(decltype(accDQ){}) / 2;
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; h++) {
        if (wg_tid == 0) tma_store_wait<0>();  // the buffer's last add has read it
        wg_sync();
        CUTLASS_PRAGMA_UNROLL
        for (int i = h * kHalf; i < (h + 1) * kHalf; i += 2) {
          // (row, dim) at row * 32 + dim in 128-byte rows whose 16-byte chunks are swizzled by
          // row % 8: DqSmem's layout, which the TMA reads.
          int r = get<0>(tQcQ(i)), c = get<1>(tQcQ(i)) - h * kDqCols;
          *reinterpret_cast<float2*>(dq_buf + r * kDqCols + ((((c >> 2) ^ (r & 7)) << 2) | (c & 3))) =
              make_float2(accDQ(i), accDQ(i + 1));
        }
        cutlass::arch::fence_view_async_shared();
        wg_sync();
        if (wg_tid == 0) {
          copy(p.tma_dq, tDQsDQ, tDQgDQ(_, _, _, m_block, 4 * wg + 2 * chunk + h));
          tma_store_arrive();
        }
      }
    }
  };

  Barrier::wait(&s.bar_kv, 0);
  __syncthreads();  // block m's stats

  for (int it = 0; m < num_m; ++it) {
    int const stage = it & 1;
    int const m_next = Mask::next(m, n_block, len_q, len_k);
    // The next block into the other stage: the barrier ending the last iteration freed it.
    if (m_next < num_m) {
      if (tid == 0) load_block(m_next, stage ^ 1);
      load_stats(m_next, stage ^ 1);
    }
    Barrier::wait(&s.bar_q[stage], (it >> 1) & 1);

    warpgroup_fence_operand(accS);
    warpgroup_fence_operand(accDP);
    warpgroup_arrive();
    gemm_zero_acc(mma_sdp, tSrQ(_, _, _, stage), tSrK, accS);
    gemm_zero_acc(mma_sdp, tSrDO(_, _, _, stage), tSrV, accDP);
    warpgroup_commit_batch();
    uint32_t keep = 0;
    if constexpr (kDropout) keep = draw_keep(m);  // on the integer pipes, beside the GEMMs
    warpgroup_wait<0>();
    warpgroup_fence_operand(accS);
    warpgroup_fence_operand(accDP);

    int const first_row = m * kRows;
    bool const crosses = Mask::kCausal && first_key + kKeys - 1 > Mask::visible(first_row, len_q, len_k);
    float const* lse = s.lse[stage];
    float const* delta = s.delta[stage];
    Tensor tSsP = score_places(s.p.data());
    Tensor tSsDS = score_places(s.ds.data());
    uint32_t grad_pairs[kBias == 2 ? 8 : 1];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accS); i++) {
      int r = get<0>(tScS(i)), k = get<1>(tScS(i));
      float exponent = accS(i) * p.scale_log2;
      if constexpr (bool(kBias)) {
        float2 b = unpack_pair<Element>(bias_pairs[i / 2]);
        exponent = fmaf(i % 2 ? b.y : b.x, float(M_LOG2E), exponent);
      }
      float prob = exp2f(exponent - lse[r]);
      if (crosses && first_key + k > Mask::visible(first_row + r, len_q, len_k)) prob = 0.f;
      float dp = accDP(i);
      bool const kept = !kDropout || ((keep >> i) & 1u);
      if constexpr (kDropout) dp = kept ? dp : 0.f;
      // The bias enters the scores unscaled: its gradient is dS before the scale.
      float ds = prob * (dp - delta[r]);
      tSsP(i) = Element(kept ? prob : 0.f);
      tSsDS(i) = Element(ds * p.scale);
      if constexpr (kBias == 2) {
        uint32_t bits = Element(ds).raw();
        grad_pairs[i / 2] = i % 2 ? grad_pairs[i / 2] | (bits << 16) : bits;
      }
    }
    if constexpr (kBias == 2) {
      // The pairs of dS out (rows past len_q, keys past len_k not stored).
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; h++) {
        int row = first_row + r_lo + 8 * h;
        if (row >= len_q) continue;
        int2 hr = query_head_and_row(p, head, row);
        uint16_t* dst = p.dbias + batch * p.dbias_stride[0] + hr.x * p.dbias_stride[1] + hr.y * p.dbias_stride[2] +
                        first_key + k_lo;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < 4; j++) {
          int key = first_key + k_lo + 8 * j;
          uint32_t bits = grad_pairs[h + 2 * j];
          if (key + 1 < len_k) {
            *reinterpret_cast<uint32_t*>(dst + 8 * j) = bits;
          } else if (key < len_k) {
            dst[8 * j] = uint16_t(bits);
          }
        }
      }
    }
    if constexpr (bool(kBias)) {
      if (m_next < num_m) load_bias(m_next);  // consumed a whole block from now
    }
    cutlass::arch::fence_view_async_shared();
    __syncthreads();  // both warpgroups' keys of P and dS

    // dQ's first chunk, then dV (and dK): the chunk's adds run beside them.
    auto& dv_b = stage ? tVrDO1 : tVrDO0;
    auto& dk_b = stage ? tKrQ1 : tKrQ0;
    warpgroup_fence_operand(accDV);
    warpgroup_fence_operand(accDK);
    warpgroup_arrive();
    gemm_zero_acc(mma_q, tQrDS, tQrK0, accDQ);
    warpgroup_commit_batch();
    cute::gemm(mma_kv, tVrPt, dv_b, accDV);
    if constexpr (!FLASH_CUTLASS_D256_DQ_ATOMICS) cute::gemm(mma_kv, tKrDSt, dk_b, accDK);
    warpgroup_commit_batch();
    warpgroup_wait<1>();
    warpgroup_fence_operand(accDQ);
    add_dq(m, 0);
    warpgroup_fence_operand(accDQ);
    warpgroup_arrive();
    gemm_zero_acc(mma_q, tQrDS, tQrK1, accDQ);
    warpgroup_commit_batch();
    if constexpr (FLASH_CUTLASS_D256_DQ_ATOMICS) {  // dK beside the second chunk's atomics
      cute::gemm(mma_kv, tKrDSt, dk_b, accDK);
      warpgroup_commit_batch();
      warpgroup_wait<1>();
    } else {
      warpgroup_wait<0>();
    }
    warpgroup_fence_operand(accDQ);
    add_dq(m, 1);
    warpgroup_wait<0>();
    warpgroup_fence_operand(accDV);
    warpgroup_fence_operand(accDK);
    __syncthreads();  // this stage, P and dS are free
    m = m_next;
  }
  if (!FLASH_CUTLASS_D256_DQ_ATOMICS && wg_tid == 0) tma_store_wait<0>();  // the buffer outlives its reads

  // dK (dS carried the scale) and dV of this warpgroup's dims, keys past len_k not stored.
  Tensor tKVc = thr_kv.partition_C(make_identity_tensor(Shape<Int<kKeys>, Int<kDim / 2>>{}));  // (key, dim)
  Element* dk = p.dk + batch * p.dk_stride[0] + head * p.dk_stride[1];
  Element* dv = p.dv + batch * p.dv_stride[0] + head * p.dv_stride[1];
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(accDK); i++) {
    int key = first_key + get<0>(tKVc(i)), dim = wg * (kDim / 2) + get<1>(tKVc(i));
    if (key < len_k) {
      dk[key * p.dk_stride[2] + dim] = Element(accDK(i));
      dv[key * p.dv_stride[2] + dim] = Element(accDV(i));
    }
  }
#endif
}

}  // namespace d256

template <int kDtype, int kMask, int kBias, bool kDropout>
int run_bwd_d256(FlashCutlassBwdParams const& p, char* err, int err_len) {
  using Element = ElementFor<kDtype>;
  using K = d256::Kernel<Element>;
  using namespace cute;
  if (p.head_dim != d256::kDim) {
    snprintf(err, err_len, "head_dim=%d: this kernel is built for head dim 256", p.head_dim);
    return 2;
  }
  if ((p.bias != nullptr) != bool(kBias) || (p.dbias != nullptr) != (kBias == 2) ||
      (p.dropout_p > 0.f) != kDropout) {
    snprintf(err, err_len, "bias=%d dbias=%d dropout_p=%g: not this instance's (bias %d, dropout %d)",
             int(p.bias != nullptr), int(p.dbias != nullptr), double(p.dropout_p), kBias, int(kDropout));
    return 2;
  }
  if constexpr (bool(kBias)) {
    // Pairs of keys by 32-bit loads: an even address and strides; the gradient's zeros go 16 bytes
    // a store.
    if (reinterpret_cast<uintptr_t>(p.bias) % 4 || p.bias_stride[0] % 2 || p.bias_stride[1] % 2 ||
        p.bias_stride[2] % 2 || p.groups < 1 || p.rows_per_head < 1) {
      snprintf(err, err_len, "bias: needs a 4-byte-aligned address, even strides, groups >= 1 and rows_per_head >= 1");
      return 2;
    }
    if (kBias == 2 && !tma_aligned(p.dbias, p.dbias_stride, 8)) {
      snprintf(err, err_len, "dbias: needs a 16-byte-aligned address and strides");
      return 2;
    }
  }
  if constexpr (kDropout) {
    if (p.seed == nullptr || p.drop_threshold >= (1u << 16) || p.groups < 1 || p.rows_per_head < 1) {
      snprintf(err, err_len, "dropout: needs the seed tensor, drop_threshold < 2^16, groups >= 1 and "
               "rows_per_head >= 1 (got drop_threshold=%u)", p.drop_threshold);
      return 2;
    }
  }
  bool reached = p.batch > 0 && p.heads > 0 && p.len_q > 0 && p.len_k > 0 &&
                 !(kMask == FLASH_CUTLASS_CAUSAL_TOP_LEFT && p.len_k > p.len_q) &&
                 !(kMask == FLASH_CUTLASS_CAUSAL_BOTTOM_RIGHT && p.len_q > p.len_k) &&
                 !(kMask == FLASH_CUTLASS_CAUSAL_FOLDED && (p.len_k % d256::kKeys || p.len_q % p.len_k));
  if (!reached) {
    snprintf(err, err_len, "backward needs non-empty sizes and every key visible to some row (top-left causal: "
             "len_k <= len_q; bottom-right: len_q <= len_k; folded: len_k a multiple of 64 dividing len_q); got "
             "len_q=%d len_k=%d mask=%d", p.len_q, p.len_k, kMask);
    return 2;
  }
  if (p.batch > 65535 || p.heads > 65535) {
    snprintf(err, err_len, "batch=%d heads=%d: the grid takes at most 65535 of each", p.batch, p.heads);
    return 2;
  }
  constexpr int kElems = 16 / int(sizeof(Element));
  for (auto [ptr, s] : {std::pair{p.q, p.q_stride}, std::pair{p.k, p.k_stride}, std::pair{p.v, p.v_stride},
                        std::pair{p.dout, p.dout_stride}}) {
    if (!tma_aligned(ptr, s, kElems)) {
      snprintf(err, err_len, "a tensor is not 16-byte aligned (address or batch/head/row stride)");
      return 2;
    }
    if (s[0] > INT32_MAX || s[1] > INT32_MAX || s[2] > INT32_MAX) {
      snprintf(err, err_len, "a stride of 2^31 elements or more (the TMA descriptors take 32-bit strides)");
      return 2;
    }
  }
  if (reinterpret_cast<uintptr_t>(p.dq_acc) % 16 || int64_t(p.batch) * p.heads * p.len_q * d256::kDim > INT32_MAX) {
    snprintf(err, err_len, "the dQ accumulator needs a 16-byte-aligned address and fewer than 2^31 elements (its TMA "
             "descriptor takes 32-bit strides)");
    return 2;
  }

  // The dQ accumulator: [batch, heads, len_q, 256] float32, contiguous.
  Tensor dq_acc = make_tensor(make_gmem_ptr(p.dq_acc), make_shape(p.len_q, Int<d256::kDim>{}, p.heads, p.batch),
                              make_stride(Int<d256::kDim>{}, _1{}, p.len_q * d256::kDim, p.heads * p.len_q * d256::kDim));
  auto tma = [&](void const* ptr, int64_t const* st, int rows) {
    Tensor t = make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)),
                           make_shape(rows, Int<d256::kDim>{}, p.heads, p.batch),
                           make_stride(int(st[2]), _1{}, int(st[1]), int(st[0])));
    return make_tma_copy(SM90_TMA_LOAD{}, t, typename K::L::Tile{});
  };
  typename K::Params params{tma(p.q, p.q_stride, p.len_q), tma(p.k, p.k_stride, p.len_k),
                            tma(p.v, p.v_stride, p.len_k), tma(p.dout, p.dout_stride, p.len_q),
                            make_tma_copy(SM90_TMA_REDUCE_ADD{}, dq_acc, typename K::DqSmem{}),
                            static_cast<Element*>(p.dk), static_cast<Element*>(p.dv), p.dq_acc, p.lse, p.delta,
                            {p.dk_stride[0], p.dk_stride[1], p.dk_stride[2]},
                            {p.dv_stride[0], p.dv_stride[1], p.dv_stride[2]},
                            p.batch, p.heads, p.len_q, p.len_k, p.scale, p.scale * float(M_LOG2E),
                            static_cast<uint16_t const*>(p.bias), {p.bias_stride[0], p.bias_stride[1], p.bias_stride[2]},
                            static_cast<uint16_t*>(p.dbias),
                            {p.dbias_stride[0], p.dbias_stride[1], p.dbias_stride[2]},
                            // Without a bias or dropout no row is mapped to its query head.
                            kBias || kDropout ? p.groups : 1, kBias || kDropout ? p.rows_per_head : 1,
                            p.seed, p.drop_threshold};

  auto kernel = d256::bwd_kernel<Element, d256::MaskFor<kMask>, kBias, kDropout>;
  int smem = int(sizeof(d256::SharedStorage<Element>)) + 1024;  // + the alignment to 1024 bytes
  static_assert(sizeof(d256::SharedStorage<Element>) + 1024 <= 227 * 1024, "more shared memory than an sm_90 block has");
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  dim3 grid(ceil_div(p.len_k, d256::kKeys), p.heads, p.batch);
  kernel<<<grid, d256::kThreads, smem, static_cast<cudaStream_t>(p.stream)>>>(params);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    snprintf(err, err_len, "launch of the head-dim-256 backward failed: %s", cudaGetErrorString(status));
    return 3;
  }
  return 0;
}

}  // namespace flash_cutlass

#define FLASH_CUTLASS_BWD_D256_INSTANCE(DTYPE, MASK, BIAS, DROPOUT) \
  template int flash_cutlass::run_bwd_d256<DTYPE, MASK, BIAS, DROPOUT>(FlashCutlassBwdParams const&, char*, int);
