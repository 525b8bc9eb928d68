// Hopper (sm_90a) backward: example 88's TMA + warp-specialised backward collective (from the
// nvidia-cutlass wheel, used as a library: its loads, pipelines, tiled MMAs, dQ reducer warp and
// dK/dV epilogue) with our own consumer (`compute` below), the softmax scale from the caller and
// our masks. One CTA owns a block of 128 keys and walks the query blocks of 64 rows; its two
// consumer warpgroups take 64 keys each. Per query block a warpgroup computes Sᵀ = K Qᵀ and
// dPᵀ = V dOᵀ, P from the forward's lse, dS = P (dP - delta) scale, then dV += P dO and
// dK += dS Q; dQ = dS K for the whole 128-key block goes through shared memory to the reducer
// warp, which adds it into a float32 accumulator by TMA reduce-add. delta (rowsum(dO O) - dlse)
// and the zeroed accumulator come from the Triton preprocess kernel; the caller converts dQ.
//
// What the example's own consumer lacks, and this one adds: bf16 (its dS conversion is implicit,
// which cutlass::bfloat16_t refuses), any scale, masks in the backward's orientation that are
// applied only to the tiles crossing the diagonal, bottom-right / folded (grouped KV heads)
// causal, and the forward's additive bias (kBias 1, its tiles through shared memory), with its
// gradient (kBias 2: dS out through the same buffer), and dropout (kDropout: the keep bits from a
// ring in shared memory that csrc/bwd_dropout.cuh's kernel fills). One instantiation per
// translation unit (flash_inductor/cutlass_build.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <utility>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/pipeline/pipeline.hpp"
#include "collective/fmha_fusion.hpp"
#include "collective/fmha_collective_bwd_tma_warpspecialized.hpp"
#include "collective/fmha_epilogue_bwd.hpp"
#include "kernel/fmha_kernel_tma_warpspecialized.hpp"
#include "kernel/fmha_tile_scheduler.hpp"
#include "device/device_universal.hpp"

#include "element_bits.cuh"
#include "flash_cutlass_bwd.h"
#include "launch.cuh"

namespace flash_cutlass {

using namespace cute;
using cutlass::fmha::collective::gemm_zero_acc;
using cutlass::fmha::collective::make_acc_into_op;

// Masks seen from a key block. Coordinates: a block is (query block, key block) of the CTA tile
// (64 queries, 128 keys); a score's position is (key, query). Row r sees key k iff
// k <= Derived::visible(r, problem size).
template <class Derived>
struct BwdDiagonal {
  template <class BlkCoord, class TileShape, class PS>
  CUTLASS_DEVICE int get_trip_count(BlkCoord const&, TileShape const& tile, PS const& ps) {
    return ceil_div(get<2>(ps), get<0>(tile));
  }

  // Whether any row of the query block sees any key of the key block. Rows of a block are
  // consecutive positions (the folded mask's caller keeps a block inside one query head).
  template <class BlkCoord, class TileShape, class PS>
  CUTLASS_DEVICE bool is_contributing(BlkCoord const& blk, TileShape const& tile, PS const& ps) {
    int last_row = get<0>(blk) * get<0>(tile) + get<0>(tile) - 1;
    return Derived::visible(last_row, ps) >= get<1>(blk) * get<1>(tile);
  }

  // Whether a tile of `rows` queries from `first_row` and `keys` keys from `first_key` has a
  // score the mask hides (else it skips the masking instructions).
  template <class PS>
  CUTLASS_DEVICE static bool crosses(int first_row, int first_key, int keys, PS const& ps) {
    return first_key + keys - 1 > Derived::visible(first_row, ps);
  }

  template <class Acc, class Index, class PS>
  CUTLASS_DEVICE void before_softmax(Acc& acc, Index const& index, PS const& ps) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc); i++) {
      auto pos = index(i);
      if (get<0>(pos) > Derived::visible(get<1>(pos), ps)) acc(i) = -INFINITY;
    }
  }
};

struct BwdTopLeft : BwdDiagonal<BwdTopLeft> {
  template <class PS> CUTLASS_DEVICE static int visible(int row, PS const&) { return row; }
};

// len_q <= len_k (the caller checks): row r sees k <= r + len_k - len_q.
struct BwdBottomRight : BwdDiagonal<BwdBottomRight> {
  template <class PS> CUTLASS_DEVICE static int visible(int row, PS const& ps) {
    return row + get<3>(ps) - get<2>(ps);
  }
};

// Grouped KV heads folded into rows (row = g * len_k + position; len_q = G * len_k, len_k a
// multiple of 128, so a 64-row block stays in one query head): top-left on the position.
struct BwdFolded : BwdDiagonal<BwdFolded> {
  template <class PS> CUTLASS_DEVICE static int visible(int row, PS const& ps) { return row % get<3>(ps); }
};

// No mask: every query block, nothing hidden. Keys past len_k and rows past len_q need no mask
// either: their K, V, Q, dO, lse and delta load as zeros (TMA fills), so they add nothing to dQ,
// dK or dV of a real key or row, and their own dK/dV/dQ are clipped by the stores.
struct BwdNoMask {
  template <class BlkCoord, class TileShape, class PS>
  CUTLASS_DEVICE int get_trip_count(BlkCoord const&, TileShape const& tile, PS const& ps) {
    return ceil_div(get<2>(ps), get<0>(tile));
  }
  template <class BlkCoord, class TileShape, class PS>
  CUTLASS_DEVICE bool is_contributing(BlkCoord const&, TileShape const&, PS const&) { return true; }
  template <class PS>
  CUTLASS_DEVICE static bool crosses(int, int, int, PS const&) { return false; }
  template <class Acc, class Index, class PS>
  CUTLASS_DEVICE void before_softmax(Acc&, Index const&, PS const&) {}
};

template <int kMask>
using BwdMaskFor = std::conditional_t<
    kMask == FLASH_CUTLASS_CAUSAL_TOP_LEFT, BwdTopLeft,
    std::conditional_t<kMask == FLASH_CUTLASS_CAUSAL_BOTTOM_RIGHT, BwdBottomRight,
                       std::conditional_t<kMask == FLASH_CUTLASS_CAUSAL_FOLDED, BwdFolded, BwdNoMask>>>;

// Whether each warpgroup hands its dS over before it issues its dV GEMM, and warpgroup 1 issues
// the dQ GEMM ahead of its dV GEMM: the dQ GEMM is on the chain the turns below wait on, dV is
// not (off: example 88's order; benchmarks/cutlass_bwd_time.py --variant times it).
#ifndef FLASH_CUTLASS_BWD_DQ_FIRST
#define FLASH_CUTLASS_BWD_DQ_FIRST 0
#endif

// Whether the dQ GEMM is split over both warpgroups by head-dim halves (each dS·K over the
// block's 128 keys for 64 of the head dims) instead of warpgroup 1 computing all of it: the
// warpgroups then exchange dS through a named barrier and double-buffer it (by block parity,
// 16 KB more shared memory), so a warpgroup never waits for the other's dQ GEMM to write its
// next dS. FA3's split. Off: example 88's schedule; benchmarks/cutlass_bwd_time.py --variant
// times it. Written in session 20 after its device time was spent: not yet run on a GPU.
#ifndef FLASH_CUTLASS_BWD_DQ_SPLIT
#define FLASH_CUTLASS_BWD_DQ_SPLIT 0
#endif

// The bias instances read each tile's bias from shared memory, copied there by cp.async one
// contributing query block ahead (each warpgroup its 64 rows x 64 keys, 8 KB, in the 17 920
// bytes the collective leaves), and write the bias gradient through the same buffer. Loaded
// from global memory into registers after the QK GEMM instead, the loads were consumed a DRAM
// round trip later inside the warpgroups' turns: 262 / 218 TFLOP/s against this design's
// 422 / 332 (H100, bf16, N=8192, no mask / causal; session 22). Do not go back to it.

// Whether a thread moves its 16 pairs of a bias (and gradient) tile between the buffer and its
// registers by 4 ldmatrix / stmatrix .x4.trans (8 x 8 matrices of 8 queries x 8 keys, transposed
// into the accumulator's pairs: one key, two adjacent queries) instead of 32 2-byte loads or
// stores and the packing between them. Off: written in session 22, timed by
// benchmarks/cutlass_bwd_time.py --bias --variant.
#ifndef FLASH_CUTLASS_BWD_BIAS_LDSM
#define FLASH_CUTLASS_BWD_BIAS_LDSM 0
#endif

// Whether the bias copy takes one address per tile for tiles inside the problem (below; off: the
// per-row walk for every tile, as timed against it by benchmarks/cutlass_bwd_time.py --variant).
#ifndef FLASH_CUTLASS_BWD_BIAS_WHOLE_TILES
#define FLASH_CUTLASS_BWD_BIAS_WHOLE_TILES 1
#endif

// A measurement probe, never built by a library (benchmarks/cutlass_bwd_time.py --variant builds
// it): dropout's consumers read their keep bits but do not apply them (wrong gradients), so a
// timing shows what the two selects a score cost.
#ifndef FLASH_CUTLASS_BWD_DROPOUT_PROBE_NO_APPLY
#define FLASH_CUTLASS_BWD_DROPOUT_PROBE_NO_APPLY 0
#endif

// The forward's bias in the backward (FlashCutlassBwdParams.bias), and its gradient (.dbias).
struct BwdBiasArgs {
  void const* ptr = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_q = 0;  // elements; the key stride is 1
  int groups = 1, rows_per_head = 0;                 // grouped KV heads folded into rows
  float inv_scale = 1.f;
  void* grad = nullptr;  // [batch, query head, row, key] as the bias, its own strides
  int64_t grad_stride_b = 0, grad_stride_h = 0, grad_stride_q = 0;
};

// Dropout in the backward (FlashCutlassBwdParams.seed, .drop_threshold): the forward's keep bits,
// regenerated from the seed (dropout_philox.h).
struct BwdDropoutArgs {
  int64_t const* seed = nullptr;  // the op's seed tensor on the device: Philox key, offset
  uint32_t threshold = 0;         // round(p * 2^16): a 16-bit draw below it dropped its score
  uint32_t high_threshold = 0;    // threshold << 16 (< 2^32: the caller keeps threshold below 2^16)
  int heads_q = 1;                // query heads: the draw is keyed by b * heads_q + query head
  int groups = 1, rows_per_head = 1;  // grouped KV heads folded into rows
};

// kBias: 0 none, 1 the forward's bias read into the scores, 2 that and its gradient (dS) written.
// kDropout: the keep bits drawn by the load warpgroup's two spare warps (csrc/bwd_dropout.cuh)
// and applied to P and dP.
template <class Element, class Tile, class Mask, int kBias = 0, bool kDropout = false>
struct BwdMainloop : cutlass::fmha::collective::FmhaBwdMainloopTmaWarpSpecialized<Element, float, Tile, Mask> {
  using Base = cutlass::fmha::collective::FmhaBwdMainloopTmaWarpSpecialized<Element, float, Tile, Mask>;
  using typename Base::ElementAccumulator;
  using typename Base::TileShape;
  using typename Base::TileShapeNM;
  using typename Base::TileShapeND;
  using typename Base::TileShapeMD;
  using typename Base::TiledMmaNM;
  using typename Base::TiledMmaND;
  using typename Base::TiledMmaND_SS;
  using typename Base::TiledMmaMD;
  using typename Base::MainloopPipeline;
  using typename Base::MainloopPipelineQ;
  using typename Base::PipelineState;
  using typename Base::PipelineStateQ;
  using Base::NumMmaWarpGroups;
  using Base::StageCount;
  static constexpr bool kBiasGrad = kBias == 2;
  static constexpr bool kBiasLdsm = FLASH_CUTLASS_BWD_BIAS_LDSM;
  static constexpr bool kDqFirst = FLASH_CUTLASS_BWD_DQ_FIRST;
  static constexpr bool kDqSplit = FLASH_CUTLASS_BWD_DQ_SPLIT;
  static_assert(!(kDqFirst && kDqSplit), "one dQ schedule at a time");

  // The split dQ GEMM: (64 queries, head_dim / 2, 64 keys) per call, A = dS (as the example's),
  // B = this warpgroup's head-dim half of a K stage: in the K buffer (64 keys x head_dim, K-major,
  // 128-byte swizzle atoms of 64 dims, tiled over the keys first) a half is one contiguous block
  // of 64 x head_dim / 2 elements, the layout of a one-stage MN-major B operand of that shape.
  using TileShapeMDh = Shape<tuple_element_t<0, TileShapeMD>, decltype(tuple_element_t<1, TileShapeMD>{} / _2{}),
                             tuple_element_t<2, TileShapeMD>>;
  using CollectiveMmaMDh = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cute::tuple<_1, int, cute::tuple<int, int>>,
      Base::Alignment, Element, cute::tuple<_1, int, cute::tuple<int, int>>, Base::Alignment, ElementAccumulator,
      TileShapeMDh, typename Base::ClusterShape, typename Base::Stages,
      cutlass::gemm::KernelTmaWarpSpecialized>::CollectiveOp;
  using TiledMmaMDh = typename CollectiveMmaMDh::TiledMma;
  using SmemLayoutKph = typename CollectiveMmaMDh::SmemLayoutB;
  static constexpr int kKStageElems = cute::cosize_v<typename Base::SmemLayoutK> / StageCount;
  static constexpr int kKHalfElems = size<1>(TileShapeMDh{}) * size<2>(TileShapeMDh{});
  static_assert(kKStageElems == 2 * kKHalfElems);

  struct SplitSharedStorage : Base::SharedStorage {
    // The second dS buffer of the split schedule (blocks of odd parity).
    alignas(512) cute::array_aligned<Element, cute::cosize_v<typename Base::SmemLayoutDS>> smem_ds2;
  };
  // With a bias: per warpgroup one tile of the bias (then of its gradient), [64 rows][64 keys] in
  // q's dtype, 16-byte chunks swizzled (chunk ^ row % 8) so that the accumulator-layout reads and
  // writes (rows 2c + e) are free of bank conflicts.
  static constexpr int kBiasTileRows = get<1>(TileShapeNM{}), kBiasTileKeys = get<0>(TileShapeNM{});
  struct BiasSharedStorage : Base::SharedStorage {
    alignas(128) cute::array_aligned<uint16_t, NumMmaWarpGroups * kBiasTileRows * kBiasTileKeys> smem_bias;
  };
  static_assert(!(kDqSplit && kBias), "the split dQ's second dS buffer and the bias tiles do not both fit");
  static_assert(!(kDropout && (kDqSplit || kDqFirst)), "dropout is built on example 88's dQ schedule");
  using MaskFusion = Mask;
  static constexpr bool kWithDropout = kDropout;
  using StorageBeforeDropout = std::conditional_t<
      kDqSplit, SplitSharedStorage, std::conditional_t<bool(kBias), BiasSharedStorage, typename Base::SharedStorage>>;

  // Dropout: the keep bits of a query block's tile, one 32-bit word per consumer thread (bit i:
  // its accumulator's score i), in a ring the spare load warps fill ahead of the consumers. Two
  // stages let them draw a block ahead; with the bias tiles only one fits (the 17 920 bytes the
  // collective leaves hold 16 KB of bias tiles and 1 KB of bits).
  static constexpr int kKeepWords = NumMmaWarpGroups * cutlass::NumThreadsPerWarpGroup;
  static constexpr int kKeepStages = kBias ? 1 : 2;
  using KeepPipeline = cutlass::PipelineAsync<kKeepStages>;
  using KeepState = typename KeepPipeline::PipelineState;
  struct DropoutSharedStorage : StorageBeforeDropout {
    alignas(16) cute::array_aligned<uint32_t, kKeepStages * kKeepWords> smem_keep;
    alignas(16) typename KeepPipeline::SharedStorage keep_pipeline;
    // The draw's Philox round keys (k0, k1 of each of 10 rounds) and folded offset, made once
    // per CTA from the seed tensor (csrc/bwd_dropout.cuh).
    alignas(16) cute::array_aligned<uint32_t, 24> keep_keys;
  };
  using SharedStorage = std::conditional_t<kDropout, DropoutSharedStorage, StorageBeforeDropout>;

  struct Arguments : Base::Arguments {
    float scale;
    BwdBiasArgs bias;
    BwdDropoutArgs dropout;
  };

  struct Params : Base::Params {
    BwdBiasArgs bias;
    BwdDropoutArgs dropout;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_size, Arguments const& args, void* workspace) {
    Params params{Base::to_underlying_arguments(problem_size, args, workspace), args.bias, args.dropout};
    params.scale_softmax = args.scale;
    params.scale_softmax_log2 = args.scale * static_cast<float>(M_LOG2E);
    params.bias.inv_scale = 1.f / args.scale;
    return params;
  }

  // Score pairs a thread holds in a tile (the accumulator's pairs: one key, two adjacent rows).
  static constexpr int kBiasPairs = size(decltype(partition_fragment_C(TiledMmaNM{}, take<0, 2>(TileShapeNM{}))){}) / 2;

  // This thread's share of the copy of query block `q_block`'s bias (this warpgroup's
  // keys) into its buffer, by cp.async: one 16-byte chunk (8 keys) in each of 4 rows 16 apart
  // (consecutive threads take consecutive chunks of a row: 128-byte coalesced rows); chunks past
  // the last row or key are zero-filled (those scores are never used). The caller checked the
  // 16-byte alignment of the bias's address and strides.
  template <class ProblemShape>
  CUTLASS_DEVICE static void copy_bias_tile(uint16_t* buffer, BwdBiasArgs const& bias, int batch, int kv_head,
                                            int q_block, int tile_key, int thread_idx,
                                            ProblemShape const& problem_size) {
    constexpr int kChunksPerRow = kBiasTileKeys / 8;
    constexpr int kRowStep = cutlass::NumThreadsPerWarpGroup / kChunksPerRow;
    static_assert(kBiasTileRows % kRowStep == 0);
    int len_q = get<2>(problem_size), len_k = get<3>(problem_size);
    uint16_t const* base = static_cast<uint16_t const*>(bias.ptr) + batch * bias.stride_b;
    // Opaque: else the rows' loop-invariant offsets are kept live across the walk (spills).
    int64_t stride_q = bias.stride_q;
    asm volatile("mov.b64 %0, %0;" : "+l"(stride_q));
    int r0 = thread_idx / kChunksPerRow, chunk = thread_idx % kChunksPerRow;
    int key = tile_key + chunk * 8;
    int key_bytes = max(0, min(8, len_k - key)) * 2;
    // Rows r0 + kRowStep j share r0 % 8 (kRowStep is a multiple of 8), so the swizzled chunk too.
    static_assert(kRowStep % 8 == 0);
    uint32_t dst = cute::cast_smem_ptr_to_uint(buffer + r0 * kBiasTileKeys + ((chunk ^ (r0 % 8)) * 8));
    if (FLASH_CUTLASS_BWD_BIAS_WHOLE_TILES && bias.groups == 1 && (q_block + 1) * kBiasTileRows <= len_q &&
        tile_key + kBiasTileKeys <= len_k) {
      // A tile inside the problem (every tile but the last row and key blocks): one address and
      // a row step, full copies (the walk below costs about 100 instructions a tile: ncu, session
      // 22). The condition is the warpgroup's, never a thread's: a warp mixing full copies with
      // the walk's partial zero-filled ones read a row's padding into keys past len_k (session 22,
      // call 5; cause below the source, not found).
      uint16_t const* src = base + kv_head * bias.stride_h + (q_block * kBiasTileRows + r0) * stride_q + key;
      int64_t step = kRowStep * stride_q;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kBiasTileRows / kRowStep; j++) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                     ::"r"(dst + uint32_t(j * kRowStep * kBiasTileKeys * 2)), "l"(src + j * step));
      }
      asm volatile("cp.async.commit_group;\n" ::);
      return;
    }
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kBiasTileRows / kRowStep; j++) {
      int row = q_block * kBiasTileRows + r0 + j * kRowStep;
      int64_t head = kv_head, head_row = row;
      if (bias.groups != 1) {
        head = int64_t(kv_head) * bias.groups + row / bias.rows_per_head;
        head_row = row % bias.rows_per_head;
      }
      int bytes = row < len_q ? key_bytes : 0;
      uint16_t const* src = bytes ? base + head * bias.stride_h + head_row * stride_q + key : base;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                   ::"r"(dst + uint32_t(j * kRowStep * kBiasTileKeys * 2)), "l"(src), "r"(bytes));
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }

  // kBias 2: this thread's share of writing query block `q_block`'s gradient tile (this
  // warpgroup's keys) from its buffer, or zeros for a block the mask skips, into the [batch, query
  // head, row, key] gradient: the chunks copy_bias_tile fills, 16 bytes a store, 128-byte rows.
  // (From registers in the accumulator's layout, each store wrote 2 bytes to 4 rows at a time:
  // the bias gradient cost 735 us of a 3.2 ms backward where Triton's costs 390, session 22.) A
  // thread reads only the chunks its own next copy_bias_tile overwrites, and stores each value it
  // read before that copy is issued, so no barrier sits between the two. Nothing is written past
  // the last row or key; the caller checked the 16-byte alignment of the address and strides.
  template <bool kZeros, class ProblemShape>
  CUTLASS_DEVICE static void store_grad_tile(uint16_t const* buffer, BwdBiasArgs const& bias, int batch, int kv_head,
                                             int q_block, int tile_key, int thread_idx,
                                             ProblemShape const& problem_size) {
    constexpr int kChunksPerRow = kBiasTileKeys / 8;
    constexpr int kRowStep = cutlass::NumThreadsPerWarpGroup / kChunksPerRow;
    int len_q = get<2>(problem_size), len_k = get<3>(problem_size);
    uint16_t* base = static_cast<uint16_t*>(bias.grad) + batch * bias.grad_stride_b;
    int64_t stride_q = bias.grad_stride_q;
    asm volatile("mov.b64 %0, %0;" : "+l"(stride_q));
    int r0 = thread_idx / kChunksPerRow, chunk = thread_idx % kChunksPerRow;
    int key = tile_key + chunk * 8;
    if (key >= len_k) return;
    uint32_t src = cute::cast_smem_ptr_to_uint(buffer + r0 * kBiasTileKeys + ((chunk ^ (r0 % 8)) * 8));
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kBiasTileRows / kRowStep; j++) {
      int row = q_block * kBiasTileRows + r0 + j * kRowStep;
      if (row >= len_q) break;
      int64_t head = kv_head, head_row = row;
      if (bias.groups != 1) {
        head = int64_t(kv_head) * bias.groups + row / bias.rows_per_head;
        head_row = row % bias.rows_per_head;
      }
      uint16_t* dst = base + head * bias.grad_stride_h + head_row * stride_q + key;
      uint32_t v[4] = {0u, 0u, 0u, 0u};
      if constexpr (!kZeros) {
        asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                     : "r"(src + uint32_t(j * kRowStep * kBiasTileKeys * 2)));
      }
      if (key + 8 <= len_k) {
        asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n"
                     ::"l"(dst), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3]) : "memory");
      } else {
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < 8; e++) {
          if (e < len_k - key) dst[e] = static_cast<uint16_t>(v[e / 2] >> (16 * (e % 2)));
        }
      }
    }
  }

  // This warpgroup's named barrier, which the compiler may not move shared-memory accesses across
  // (cutlass's NamedBarrier::sync carries no memory clobber).
  CUTLASS_DEVICE static void sync_warpgroup(int wg_idx) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(1 + wg_idx), "n"(cutlass::NumThreadsPerWarpGroup) : "memory");
  }

  // Score i's place in a warpgroup's buffer is row * 64 + ((key / 8) ^ (row % 8)) * 8 +
  // key % 8 (tile-local row and key). In the 64 x 64 wgmma accumulator a thread's first score
  // sits at an even key chunk (2 x its warp) and an even row (2 x lane % 4), and its others
  // differ from it by 0 or 8 keys and by rows whose (row % 8) is 0 or 1: neither carries, so the
  // XOR splits and every score is the first's offset plus a constant (`bias_smem_delta`). The
  // addresses then cost one register, not 32 loop-invariant ones (which spilled).
  template <class Coords>
  CUTLASS_DEVICE static int bias_smem_first(Coords const& tScS, int tile_row, int tile_key) {
    int k0 = get<0>(tScS(0)) - tile_key, r0 = get<1>(tScS(0)) - tile_row;
    return r0 * kBiasTileKeys + (((k0 / 8) ^ (r0 % 8)) * 8) + k0 % 8;
  }

  template <class Coords>
  CUTLASS_DEVICE static int bias_smem_delta(Coords const& tScS, int i) {
    int dk = get<0>(tScS(i)) - get<0>(tScS(0)), dr = get<1>(tScS(i)) - get<1>(tScS(0));
    return dr * kBiasTileKeys + (((dk / 8) ^ (dr % 8)) * 8);
  }

  // kBiasLdsm: the address thread `thread_idx` gives the .x4 ldmatrix / stmatrix of pairs 0-3
  // (add 2048 bytes per next 4). The wgmma accumulator's pair p of warp w (of the warpgroup) is
  // key 16 w + lane / 4 + 8 (p % 2) and queries 8 (p / 2) + 2 (lane % 4) + {0, 1}: in an x4, matrix
  // m (addresses from lanes 8 m to 8 m + 7, one query row each) holds pair m, so its queries are
  // 8 (m / 2) + lane % 8 and its keys the 16-byte chunk 2 w + m % 2, swizzled as the copy stores it.
  CUTLASS_DEVICE static uint32_t bias_matrix_address(uint16_t const* buffer, int thread_idx) {
    static_assert(kBiasPairs == 16 && kBiasTileRows == 64 && kBiasTileKeys == 64, "a 64 x 64 tile per warpgroup");
    int lane = thread_idx % 32, warp = thread_idx / 32, m = lane / 8, i = lane % 8;
    int query = 8 * (m / 2) + i, chunk = 2 * warp + m % 2;
    return cute::cast_smem_ptr_to_uint(buffer + query * kBiasTileKeys + ((chunk ^ i) * 8));
  }

  template <class BlkCoord, class ProblemShape, class MainloopPipelineReducer, class PipelineStateReducer,
            class MathWgOrderBarrier>
  CUTLASS_DEVICE auto compute(BlkCoord const& blk_coord, BlkCoord const& wg_coord, Params const& params,
                              ProblemShape const& problem_size, MainloopPipeline& pipeline_inner,
                              PipelineState& smem_pipe_read_inner, MainloopPipelineQ& pipeline_outer,
                              PipelineStateQ& smem_pipe_read_outer, MainloopPipelineReducer& pipeline_reducer,
                              PipelineStateReducer& smem_pipe_write_reducer, SharedStorage& storage,
                              MathWgOrderBarrier& math_wg_order_barrier, KeepState* keep_state = nullptr) {
    TiledMmaND tiled_mma_nd;
    Tensor acc_DV = partition_fragment_C(tiled_mma_nd, take<0, 2>(TileShapeND{}));
    Tensor acc_DK = partition_fragment_C(tiled_mma_nd, take<0, 2>(TileShapeND{}));
    clear(acc_DV);
    clear(acc_DK);

    int thread_idx = int(threadIdx.x) % cutlass::NumThreadsPerWarpGroup;
    PipelineState smem_pipe_release_inner = smem_pipe_read_inner;

    // This warpgroup's K and V (64 keys each), resident for the whole walk.
    pipeline_outer.consumer_wait(smem_pipe_read_outer);
    PipelineStateQ smem_pipe_read_k = smem_pipe_read_outer;
    ++smem_pipe_read_outer;
    pipeline_outer.consumer_wait(smem_pipe_read_outer);
    PipelineStateQ smem_pipe_read_v = smem_pipe_read_outer;

    int inner_tile_count = this->get_inner_tile_count(wg_coord, problem_size);

    TiledMmaNM tiled_mma_nm;
    auto thr_mma_nm = tiled_mma_nm.get_thread_slice(thread_idx);
    Tensor sK = make_tensor(make_smem_ptr(storage.smem_k.data()), typename Base::SmemLayoutK{});
    Tensor sQ = make_tensor(make_smem_ptr(storage.smem_q.data()), typename Base::SmemLayoutQ{});
    Tensor tSrK = thr_mma_nm.make_fragment_A(thr_mma_nm.partition_A(sK));
    Tensor tSrQ = thr_mma_nm.make_fragment_B(thr_mma_nm.partition_B(sQ));
    Tensor sV = make_tensor(make_smem_ptr(storage.smem_v.data()), typename Base::SmemLayoutV{});
    Tensor sDO = make_tensor(make_smem_ptr(storage.smem_do.data()), typename Base::SmemLayoutDO{});
    Tensor tDPrV = thr_mma_nm.make_fragment_A(thr_mma_nm.partition_A(sV));
    Tensor tDPrDO = thr_mma_nm.make_fragment_B(thr_mma_nm.partition_B(sDO));

    auto thr_mma_nd = tiled_mma_nd.get_thread_slice(thread_idx);
    Tensor sDOp = make_tensor(make_smem_ptr(storage.smem_dop.data()), typename Base::SmemLayoutDOp{});
    Tensor tDVrDO = thr_mma_nd.make_fragment_B(thr_mma_nd.partition_B(sDOp));
    Tensor sQp = make_tensor(make_smem_ptr(storage.smem_qp.data()), typename Base::SmemLayoutQp{});
    Tensor tDKrQ = thr_mma_nd.make_fragment_B(thr_mma_nd.partition_B(sQp));

    int wg_idx = __shfl_sync(0xffffffff, get<1>(wg_coord) % NumMmaWarpGroups, 0);

    TiledMmaMD tiled_mma_md;
    auto thr_mma_md = tiled_mma_md.get_thread_slice(thread_idx);
    Tensor sDS = make_tensor(make_smem_ptr(storage.smem_ds.data()), typename Base::SmemLayoutDS{});
    Tensor tDQrDS = thr_mma_md.make_fragment_A(thr_mma_md.partition_A(sDS));
    Tensor sKp = make_tensor(make_smem_ptr(storage.smem_kp.data()), typename Base::SmemLayoutKp{});
    Tensor tDQrK = thr_mma_md.make_fragment_B(thr_mma_md.partition_B(sKp));

    // lse and delta of the block's rows, broadcast over the keys (stride 0).
    Tensor sLSE = make_tensor(make_smem_ptr(storage.smem_lse.data()),
                              make_shape(get<0>(TileShapeNM{}), get<1>(TileShapeNM{}), Int<StageCount>{}),
                              make_stride(_0{}, _1{}, get<1>(TileShapeNM{})));
    Tensor tSsLSE = thr_mma_nm.partition_C(sLSE);
    Tensor sODO = make_tensor(make_smem_ptr(storage.smem_sumOdO.data()),
                              make_shape(get<0>(TileShapeNM{}), get<1>(TileShapeNM{}), Int<StageCount>{}),
                              make_stride(_0{}, _1{}, get<1>(TileShapeNM{})));
    Tensor tDPsODO = thr_mma_nm.partition_C(sODO);

    // (key, query) of every score this thread holds, moved along the query blocks.
    Tensor cS = make_identity_tensor(take<0, 2>(TileShapeNM{}));
    Tensor tScS = thr_mma_nm.partition_C(cS);
    int n_block = get<1>(wg_coord);
    int first_key = n_block * get<0>(TileShapeNM{});
    tScS.data() = tScS.data() + E<0>{} * first_key;

    // dS transposed for dK += dSᵀ... (the (key, query) view of the (query, key) buffer).
    Tensor sDSp = sDS.compose(make_layout(make_shape(size<1>(sDS), size<0>(sDS), size<2>(sDS)),
                                          make_stride(size<0>(sDS), _1{}, size<1>(sDS) * size<0>(sDS))));
    Tensor tDPsDS = thr_mma_nm.partition_C(sDSp);
    auto thr_mma_nd_ss = TiledMmaND_SS{}.get_thread_slice(thread_idx);
    Tensor tDKrDSp = thr_mma_nd_ss.make_fragment_A(thr_mma_nd_ss.partition_A(sDSp));

    Tensor sDQ = make_tensor(make_smem_ptr(storage.smem_dq.data()), typename Base::SmemLayoutDQ{});
    auto tDQsDQ_full = thr_mma_md.partition_C(sDQ);

    auto smem_pipe_read_k_other = smem_pipe_read_k;
    smem_pipe_read_k_other.advance(2);

    // The split schedule's views: per dS buffer, the (key, query) store view, the dK GEMM's A
    // and the half dQ GEMM's A; per K stage (this warpgroup's keys, the other's), this
    // warpgroup's head-dim half as the half dQ GEMM's B.
    TiledMmaMDh tiled_mma_mdh;
    auto thr_mma_mdh = tiled_mma_mdh.get_thread_slice(thread_idx);
    auto ds_views = [&](Element* ptr) {
      Tensor sDS_b = make_tensor(make_smem_ptr(ptr), typename Base::SmemLayoutDS{});
      Tensor sDSp_b = sDS_b.compose(make_layout(make_shape(size<1>(sDS_b), size<0>(sDS_b), size<2>(sDS_b)),
                                                make_stride(size<0>(sDS_b), _1{}, size<1>(sDS_b) * size<0>(sDS_b))));
      return make_tuple(thr_mma_nm.partition_C(sDSp_b), thr_mma_nd_ss.make_fragment_A(thr_mma_nd_ss.partition_A(sDSp_b)),
                        thr_mma_mdh.make_fragment_A(thr_mma_mdh.partition_A(sDS_b)));
    };
    auto k_half = [&](PipelineStateQ const& stage) {
      Tensor sKh = make_tensor(make_smem_ptr(storage.smem_k.data() + stage.index() * kKStageElems + wg_idx * kKHalfElems),
                               SmemLayoutKph{});
      return thr_mma_mdh.make_fragment_B(thr_mma_mdh.partition_B(sKh));
    };
    auto ds_buffer0 = ds_views(storage.smem_ds.data());
    auto ds_buffer1 = ds_views([&] {
      if constexpr (kDqSplit) return storage.smem_ds2.data();
      else return storage.smem_ds.data();  // unused
    }());
    // B of the half dQ GEMM against dS half j: warpgroup j's K stage.
    auto tDQrKh_0 = k_half(wg_idx == 0 ? smem_pipe_read_k : smem_pipe_read_k_other);
    auto tDQrKh_1 = k_half(wg_idx == 1 ? smem_pipe_read_k : smem_pipe_read_k_other);
    int parity = 0;

    int q_block = 0;

    // This warpgroup's bias buffer, filled one contributing query block ahead.
    uint16_t* bias_buffer = nullptr;
    if constexpr (bool(kBias)) bias_buffer = storage.smem_bias.data() + wg_idx * kBiasTileRows * kBiasTileKeys;
    uint32_t bias_matrices = 0;
    if constexpr (bool(kBias) && kBiasLdsm) bias_matrices = bias_matrix_address(bias_buffer, thread_idx);
    auto prefetch_bias = [&](int qb, int remaining) {
      if constexpr (bool(kBias)) {
        while (remaining > 0 && !Mask{}.is_contributing(make_coord(qb, get<1>(blk_coord)), TileShape{}, problem_size)) {
          qb += 1;
          remaining -= 1;
        }
        if (remaining > 0) {
          copy_bias_tile(bias_buffer, params.bias, get<2, 0>(blk_coord), get<2, 1>(blk_coord), qb, first_key,
                         thread_idx, problem_size);
        }
      }
    };
    prefetch_bias(0, inner_tile_count);
    // This thread's first score's place in the buffer is the same in every tile: computed once
    // and kept opaque (derived from the moving coordinates per tile, its inputs were spilled and
    // reloaded on the critical path: ncu, session 22).
    int bias_offset = 0;
    if constexpr (bool(kBias)) {
      bias_offset = bias_smem_first(tScS, 0, first_key);
      asm volatile("mov.b32 %0, %0;" : "+r"(bias_offset));
    }
    while (inner_tile_count > 0) {
      while (inner_tile_count > 0) {
        if (Mask{}.is_contributing(make_coord(q_block, get<1>(blk_coord)), TileShape{}, problem_size)) break;
        if constexpr (kBiasGrad) {
          store_grad_tile<true>(bias_buffer, params.bias, get<2, 0>(blk_coord), get<2, 1>(blk_coord), q_block,
                                first_key, thread_idx, problem_size);
        }
        inner_tile_count -= 1;
        tScS.data() = tScS.data() + E<1>{} * get<1>(TileShapeNM{});
        q_block += 1;
      }
      if (inner_tile_count == 0) break;

      pipeline_inner.consumer_wait(smem_pipe_read_inner);
      PipelineState smem_pipe_read_q = smem_pipe_read_inner;
      ++smem_pipe_read_inner;
      PipelineState smem_pipe_read_do = smem_pipe_read_inner;
      ++smem_pipe_read_inner;

      // Sᵀ = K Qᵀ
      Tensor acc_S = partition_fragment_C(tiled_mma_nm, take<0, 2>(TileShapeNM{}));
      warpgroup_fence_operand(acc_S);
      warpgroup_arrive();
      gemm_zero_acc(tiled_mma_nm, tSrK(_, _, _, smem_pipe_read_k.index()), tSrQ(_, _, _, smem_pipe_read_q.index()),
                    acc_S);
      warpgroup_commit_batch();

      pipeline_inner.consumer_wait(smem_pipe_read_do);

      // dPᵀ = V dOᵀ
      Tensor acc_DP = partition_fragment_C(tiled_mma_nm, take<0, 2>(TileShapeNM{}));
      warpgroup_fence_operand(acc_DP);
      warpgroup_arrive();
      gemm_zero_acc(tiled_mma_nm, tDPrV(_, _, _, smem_pipe_read_v.index()),
                    tDPrDO(_, _, _, smem_pipe_read_do.index()), acc_DP);
      warpgroup_commit_batch();

      // lse · log2(e) per row, +inf for a row the bias hides entirely (lse = -inf, P = 0: the
      // op's contract), so that its exponents are -inf instead of NaN: from the preprocess.
      Tensor reg_LSE = make_fragment_like<ElementAccumulator>(acc_S);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(reg_LSE); i++) reg_LSE(i) = tSsLSE(_, _, _, smem_pipe_read_q.index())(i);
      Tensor reg_ODO = make_fragment_like<ElementAccumulator>(acc_S);

      // This thread's keep bits of the tile (bit i: score i), drawn by the spare load warps.
      uint32_t keep = 0;
      if constexpr (kDropout) {
        static_assert(decltype(size(acc_S))::value == 32, "one keep word per thread and tile");
        // The ring's barriers directly, not through the pipeline object: its consumer_release
        // arrives cluster-wide (a block id in a register), and its pointers stay live across
        // the loop (ptxas, the no-mask instance at the example's register split: 64 bytes of
        // spills with them, 56 without).
        int stage = keep_state->index();
        storage.keep_pipeline.full_barrier_[stage].wait(keep_state->phase());
        uint32_t at = cute::cast_smem_ptr_to_uint(storage.smem_keep.data() + stage * kKeepWords +
                                                  wg_idx * cutlass::NumThreadsPerWarpGroup + thread_idx);
        // volatile: the load stays ahead of the release below, which lets the stage be redrawn.
        asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(keep) : "r"(at));
        storage.keep_pipeline.empty_barrier_[stage].arrive();
        ++*keep_state;
      }

      warpgroup_wait<1>();
      warpgroup_fence_operand(acc_S);

      // The tile's bias (from the buffer, outside the turn below) and, with its gradient, the
      // tile's place in the buffer for dS.
      uint16_t* bias_first = nullptr;
      if constexpr (bool(kBias)) {
        // The tile copied one block ago: every thread's copies landed, then all read it, then
        // the next block's copy (or dS) goes into the same buffer.
        asm volatile("cp.async.wait_all;\n" ::);
        sync_warpgroup(wg_idx);
        auto add_pair = [&](int p, uint32_t bits) {
          float2 b = unpack_pair<Element>(bits);
          acc_S(2 * p) = fmaf(b.x, params.bias.inv_scale, acc_S(2 * p));
          acc_S(2 * p + 1) = fmaf(b.y, params.bias.inv_scale, acc_S(2 * p + 1));
        };
        if constexpr (kBiasLdsm) {
          CUTLASS_PRAGMA_UNROLL
          for (int g = 0; g < kBiasPairs / 4; g++) {
            uint32_t r[4];
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                         : "r"(bias_matrices + uint32_t(g * 2048)));
            CUTLASS_PRAGMA_UNROLL
            for (int m = 0; m < 4; m++) add_pair(4 * g + m, r[m]);
          }
        } else {
          bias_first = bias_buffer + bias_offset;
          CUTLASS_PRAGMA_UNROLL
          for (int p = 0; p < kBiasPairs; p++) {
            add_pair(p, uint32_t(bias_first[bias_smem_delta(tScS, 2 * p)]) |
                            (uint32_t(bias_first[bias_smem_delta(tScS, 2 * p + 1)]) << 16));
          }
        }
        // Every thread has read it: the next block's copy may go in (issued below, where fewer
        // registers are live: issued here it spilled the consumer).
        sync_warpgroup(wg_idx);
      }

      // The warpgroups take turns here (and at the dS hand-off below). Not only scheduling: the
      // order barrier lets a warpgroup run two turns ahead of the other (its depth is 2), so with
      // two turns per block warpgroup 0 writes block t+1's dS only after warpgroup 1's dQ GEMM of
      // block t is done; with this turn removed it ran a block ahead and dQ came out wrong
      // (session 20, call 3).
      math_wg_order_barrier.wait();
      if (Mask::crosses(q_block * get<1>(TileShapeNM{}), first_key, get<0>(TileShapeNM{}), problem_size)) {
        Mask{}.before_softmax(acc_S, tScS, problem_size);
      }
      auto acc_P = make_fragment_like<ElementAccumulator>(acc_S);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(acc_P); i++) acc_P(i) = ::exp2f(params.scale_softmax_log2 * acc_S(i) - reg_LSE(i));
      math_wg_order_barrier.arrive();

      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(reg_ODO); i++) reg_ODO(i) = tDPsODO(_, _, _, smem_pipe_read_do.index())(i);

      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_DP);

      // dS = P (dP - delta) scale, in the input dtype (explicitly: bf16 has no implicit conversion).
      auto acc_DS = make_fragment_like<Element>(acc_DP);
      // The bias enters the scores unscaled, so its gradient is dS before the scale, rounded once.
      Element acc_DB[kBiasGrad ? 2 * kBiasPairs : 1];
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(acc_DS); i++) {
        // Dropout: out = (P ∘ keep / (1-p)) V, so dV sums (P ∘ keep / (1-p))ᵀ dO and dS = P ∘
        // (keep ∘ dP / (1-p) - delta) = P' ∘ (keep ∘ dP - delta') with P' = P / (1-p) and
        // delta' = delta (1-p). The caller folds both into the rows' lse and delta
        // (FlashCutlassBwdParams), so a score costs two selects more than without dropout, which
        // measured free. (Applied here, 1 / (1-p) cost a multiply a score, which measured the
        // same; applied to dV once after the loop, ptxas serialised the dV wgmmas, C7515: an
        // accumulator written outside them.)
        float dp = acc_DP(i);
        if constexpr (kDropout && !FLASH_CUTLASS_BWD_DROPOUT_PROBE_NO_APPLY) dp = (keep >> i) & 1u ? dp : 0.f;
        if constexpr (kBiasGrad) {
          float ds = acc_P(i) * (dp - reg_ODO(i));
          acc_DB[i] = Element(ds);
          acc_DS(i) = Element(ds * params.scale_softmax);
        } else {
          acc_DS(i) = Element(acc_P(i) * params.scale_softmax * (dp - reg_ODO(i)));
        }
        if constexpr (kDropout && !FLASH_CUTLASS_BWD_DROPOUT_PROBE_NO_APPLY) acc_P(i) = (keep >> i) & 1u ? acc_P(i) : 0.f;
      }

      // dV += P dO (P from registers)
      auto op_P = make_acc_into_op<Element>(acc_P, typename TiledMmaND::LayoutA_TV{});
      auto issue_dv = [&] {
        warpgroup_fence_operand(acc_DV);
        warpgroup_fence_operand(op_P);
        warpgroup_arrive();
        cute::gemm(tiled_mma_nd, op_P, tDVrDO(_, _, _, smem_pipe_read_do.index()), acc_DV);
        warpgroup_commit_batch();
      };
      if constexpr (kBiasGrad) {
        // dS into the buffer the bias came from (every thread read it before the last barrier),
        // then out in coalesced rows under the dV GEMM.
        if constexpr (kBiasLdsm) {
          auto pair = [&](int p) {
            return uint32_t(reinterpret_cast<uint16_t const&>(acc_DB[2 * p])) |
                   (uint32_t(reinterpret_cast<uint16_t const&>(acc_DB[2 * p + 1])) << 16);
          };
          CUTLASS_PRAGMA_UNROLL
          for (int g = 0; g < kBiasPairs / 4; g++) {
            asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n"
                         ::"r"(bias_matrices + uint32_t(g * 2048)), "r"(pair(4 * g)), "r"(pair(4 * g + 1)),
                           "r"(pair(4 * g + 2)), "r"(pair(4 * g + 3)) : "memory");
          }
        } else {
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < 2 * kBiasPairs; i++) {
            bias_first[bias_smem_delta(tScS, i)] = reinterpret_cast<uint16_t const&>(acc_DB[i]);
          }
        }
      }
      if constexpr (!kDqFirst) issue_dv();
      if constexpr (kBiasGrad) {
        sync_warpgroup(wg_idx);
        store_grad_tile<false>(bias_buffer, params.bias, get<2, 0>(blk_coord), get<2, 1>(blk_coord), q_block,
                               first_key, thread_idx, problem_size);
      }
      prefetch_bias(q_block + 1, inner_tile_count - 1);

      auto recast_pairs = [](auto t) { return recast<uint_bit_t<sizeof_bits_v<Element> * 2>>(t); };
      if constexpr (kDqSplit) {
        // One body per buffer (a runtime choice between the two sets of views would put them
        // in local memory).
        auto split_step = [&](auto& buffer) {
          auto tDPsDS_v = recast_pairs(get<0>(buffer));
          auto acc_DS_v = recast_pairs(acc_DS);
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(acc_DS_v); i++) tDPsDS_v(_, _, _, wg_idx)(i) = acc_DS_v(i);
          cutlass::arch::fence_view_async_shared();
          // Both halves of this block's dS are written; and both warpgroups are past their dQ GEMM
          // of the block before, which read the other buffer this one will be reused after.
          cutlass::arch::NamedBarrier::sync(NumMmaWarpGroups * cutlass::NumThreadsPerWarpGroup, 0);

          Tensor acc_DQh = partition_fragment_C(tiled_mma_mdh, take<0, 2>(TileShapeMDh{}));
          warpgroup_fence_operand(acc_DQh);
          warpgroup_arrive();
          gemm_zero_acc(tiled_mma_mdh, get<2>(buffer)(_, _, _, 0), tDQrKh_0(_, _, _, 0), acc_DQh);
          cute::gemm(tiled_mma_mdh, get<2>(buffer)(_, _, _, 1), tDQrKh_1(_, _, _, 0), acc_DQh);
          warpgroup_commit_batch();

          warpgroup_fence_operand(acc_DK);
          warpgroup_arrive();
          cute::gemm(TiledMmaND_SS{}, get<1>(buffer)(_, _, _, wg_idx), tDKrQ(_, _, _, smem_pipe_read_q.index()), acc_DK);
          warpgroup_commit_batch();

          warpgroup_wait<1>();  // dV and this warpgroup's dQ half are done
          warpgroup_fence_operand(acc_DQh);

          pipeline_reducer.producer_acquire(smem_pipe_write_reducer);
          Tensor sDQh = local_tile(sDQ(_, _, smem_pipe_write_reducer.index()), take<0, 2>(TileShapeMDh{}),
                                   make_coord(_0{}, wg_idx));
          Tensor tDQsDQh = thr_mma_mdh.partition_C(sDQh);
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(acc_DQh); i++) tDQsDQh(i) = acc_DQh(i);
          cutlass::arch::fence_view_async_shared();
          pipeline_reducer.producer_commit(smem_pipe_write_reducer);
          ++smem_pipe_write_reducer;
        };
        if (parity) {
          split_step(ds_buffer1);
        } else {
          split_step(ds_buffer0);
        }
        parity ^= 1;
      } else {
      // dS into shared memory: the dK GEMM reads it (this warpgroup's keys), the dQ GEMM both.
      if (wg_idx == 0) math_wg_order_barrier.wait();
      auto tDPsDS_v = recast_pairs(tDPsDS);
      auto acc_DS_v = recast_pairs(acc_DS);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(acc_DS_v); i++) tDPsDS_v(_, _, _, wg_idx)(i) = acc_DS_v(i);
      cutlass::arch::fence_view_async_shared();
      if (wg_idx == 0) math_wg_order_barrier.arrive();

      if (wg_idx == 1) {
        math_wg_order_barrier.wait();
        // dQ = dS K over both warpgroups' keys, then to the reducer warp through shared memory.
        Tensor acc_DQ = partition_fragment_C(tiled_mma_md, take<0, 2>(TileShapeMD{}));
        warpgroup_fence_operand(acc_DQ);
        warpgroup_arrive();
        gemm_zero_acc(tiled_mma_md, tDQrDS(_, _, _, 0), tDQrK(_, _, _, smem_pipe_read_k_other.index()), acc_DQ);
        cute::gemm(tiled_mma_md, tDQrDS(_, _, _, 1), tDQrK(_, _, _, smem_pipe_read_k.index()), acc_DQ);
        warpgroup_commit_batch();
        if constexpr (kDqFirst) issue_dv();

        warpgroup_fence_operand(acc_DK);
        warpgroup_arrive();
        cute::gemm(TiledMmaND_SS{}, tDKrDSp(_, _, _, wg_idx), tDKrQ(_, _, _, smem_pipe_read_q.index()), acc_DK);
        warpgroup_commit_batch();

        // The dQ GEMM is done (behind it: dK, and with kDqFirst dV).
        warpgroup_wait<kDqFirst ? 2 : 1>();
        warpgroup_fence_operand(acc_DQ);
        math_wg_order_barrier.arrive();

        pipeline_reducer.producer_acquire(smem_pipe_write_reducer);
        auto tDQsDQ = tDQsDQ_full(_, _, _, smem_pipe_write_reducer.index());
        using Vec = uint_bit_t<sizeof_bits_v<ElementAccumulator> * 2>;
        auto tDQsDQ_v = recast<Vec>(tDQsDQ);
        auto acc_DQ_v = recast<Vec>(acc_DQ);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(acc_DQ_v); i++) tDQsDQ_v(i) = acc_DQ_v(i);
        cutlass::arch::fence_view_async_shared();
        pipeline_reducer.producer_commit(smem_pipe_write_reducer);
        ++smem_pipe_write_reducer;
      } else {
        if constexpr (kDqFirst) issue_dv();
        warpgroup_fence_operand(acc_DK);
        warpgroup_arrive();
        cute::gemm(TiledMmaND_SS{}, tDKrDSp(_, _, _, wg_idx), tDKrQ(_, _, _, smem_pipe_read_q.index()), acc_DK);
        warpgroup_commit_batch();
        warpgroup_wait<1>();
        warpgroup_fence_operand(acc_DK);
        // The reducer waits on both warpgroups' arrivals per stage.
        pipeline_reducer.producer_acquire(smem_pipe_write_reducer);
        pipeline_reducer.producer_commit(smem_pipe_write_reducer);
        ++smem_pipe_write_reducer;
      }
      }  // the example's schedule

      --inner_tile_count;
      pipeline_inner.consumer_release(smem_pipe_release_inner);
      ++smem_pipe_release_inner;
      pipeline_inner.consumer_release(smem_pipe_release_inner);
      ++smem_pipe_release_inner;

      tScS.data() = tScS.data() + E<1>{} * get<1>(TileShapeNM{});
      q_block += 1;
    }

    pipeline_outer.consumer_release(smem_pipe_read_k);
    pipeline_outer.consumer_release(smem_pipe_read_outer);
    pipeline_reducer.producer_tail(smem_pipe_write_reducer);
    ++smem_pipe_read_outer;

    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_DK);
    warpgroup_fence_operand(acc_DV);
    return make_tuple(acc_DK, acc_DV);
  }
};

// The dropout instances' kernel (csrc/bwd_dropout.cuh, included by their units only, so a change
// there does not re-key the library without dropout).
template <class Mainloop, class Epilogue, class TileScheduler>
struct BwdDropoutKernel;

// Tile (queries, keys, head dim): the example's backward choices.
template <int kHeadDim>
using BwdTileFor = Shape<_64, _128, Int<kHeadDim>>;

template <int kDtype, int kHeadDim, int kMask, int kBias, bool kDropout>
int run_bwd(FlashCutlassBwdParams const& p, char* err, int err_len) {
  using Element = ElementFor<kDtype>;
  using Mainloop = BwdMainloop<Element, BwdTileFor<kHeadDim>, BwdMaskFor<kMask>, kBias, kDropout>;
  using Epilogue = cutlass::fmha::collective::FmhaBwdEpilogueKV<Element, float, typename Mainloop::TileShapePV>;
  using Scheduler = cutlass::fmha::kernel::TileSchedulerBwdAdapter<cutlass::fmha::kernel::IndividualTileScheduler>;
  using Kernel = std::conditional_t<kDropout, BwdDropoutKernel<Mainloop, Epilogue, Scheduler>,
                                    cutlass::fmha::kernel::FmhaKernelTmaWarpSpecialized<Mainloop, Epilogue, Scheduler>>;
  using Operation = cutlass::device::Universal<Kernel>;
  using Stride4 = cute::tuple<int, int, int, _1>;  // batch, head, row, head_dim
  static_assert(Kernel::SharedStorageSize <= 227 * 1024, "more shared memory than an sm_90 block has");

  auto stride = [](int64_t const* s) { return Stride4{int(s[0]), int(s[1]), int(s[2]), _1{}}; };
  int rows = p.len_q;
  typename Mainloop::Arguments mainloop{};
  mainloop.ptr_Q = static_cast<Element const*>(p.q);
  mainloop.dQ = stride(p.q_stride);
  mainloop.ptr_K = static_cast<Element const*>(p.k);
  mainloop.dK = stride(p.k_stride);
  mainloop.ptr_V = static_cast<Element const*>(p.v);
  mainloop.dV = stride(p.v_stride);
  mainloop.ptr_dO = static_cast<Element const*>(p.dout);
  mainloop.dDO = stride(p.dout_stride);
  mainloop.ptr_LSE = p.lse;
  mainloop.dLSE = cute::tuple<int, int, _1>{p.heads * rows, rows, _1{}};
  mainloop.ptr_sum_OdO = p.delta;
  mainloop.dSumOdO = cute::tuple<int, int, _1>{p.heads * rows, rows, _1{}};
  mainloop.ptr_dQ = p.dq_acc;
  mainloop.dDQ = Stride4{p.heads * rows * p.head_dim, rows * p.head_dim, p.head_dim, _1{}};
  mainloop.scale = p.scale;
  if constexpr (kBias) {
    if (p.bias == nullptr || reinterpret_cast<uintptr_t>(p.bias) % 2 || p.groups < 1 || p.rows_per_head < 1 ||
        !(p.scale > 0.f)) {
      snprintf(err, err_len, "bias: needs a 2-byte-aligned address, groups >= 1, rows_per_head >= 1 and scale > 0");
      return 2;
    }
    mainloop.bias = BwdBiasArgs{p.bias, p.bias_stride[0], p.bias_stride[1], p.bias_stride[2], p.groups,
                                p.rows_per_head};
    if (!tma_aligned(p.bias, p.bias_stride, 8)) {
      snprintf(err, err_len, "bias: the shared-memory bias tiles need a 16-byte-aligned address and strides");
      return 2;
    }
  }
  if constexpr (kBias == 2) {
    if (p.dbias == nullptr || !tma_aligned(p.dbias, p.dbias_stride, 8)) {
      snprintf(err, err_len, "dbias: the gradient's coalesced tile stores need a 16-byte-aligned address and strides");
      return 2;
    }
    mainloop.bias.grad = p.dbias;
    mainloop.bias.grad_stride_b = p.dbias_stride[0];
    mainloop.bias.grad_stride_h = p.dbias_stride[1];
    mainloop.bias.grad_stride_q = p.dbias_stride[2];
  }

  if constexpr (kDropout) {
    // The threshold is the forward's round(p * 2^16), from the caller (Python's rounding).
    if (p.seed == nullptr || !(p.dropout_p > 0.f && p.dropout_p < 1.f) || p.drop_threshold == 0 ||
        p.drop_threshold > 65535u || p.groups < 1 || p.rows_per_head < 1) {
      snprintf(err, err_len, "dropout: needs the seed tensor, 0 < dropout_p < 1 (got %g), a threshold in "
               "[1, 65535] (got %u), groups >= 1 and rows_per_head >= 1", double(p.dropout_p), p.drop_threshold);
      return 2;
    }
    // 1 / (1-p) is not here: the caller folds it into lse and delta (flash_cutlass_bwd.h).
    mainloop.dropout = BwdDropoutArgs{p.seed, p.drop_threshold, p.drop_threshold << 16, p.heads * p.groups,
                                      p.groups, p.rows_per_head};
  } else if (p.dropout_p != 0.f) {
    snprintf(err, err_len, "dropout_p=%g: this instance has no dropout (libflash_cutlass_bwd_dropout.so has)",
             double(p.dropout_p));
    return 2;
  }

  cutlass::KernelHardwareInfo hw_info;
  hw_info.sm_count = p.sm_count;
  typename Operation::Arguments args{
      cute::make_tuple(p.batch, p.heads, p.len_q, p.len_k, p.head_dim),
      mainloop,
      {static_cast<Element*>(p.dk), stride(p.dk_stride), static_cast<Element*>(p.dv), stride(p.dv_stride)},
      hw_info};

  // Every key block must be reached by some query block: one that none reaches would leave its
  // loader and reducer waiting on each other (the Python side trims top-left causal's unseen keys).
  bool reached = p.batch > 0 && p.heads > 0 && p.len_q > 0 && p.len_k > 0 &&
                 !(kMask == FLASH_CUTLASS_CAUSAL_TOP_LEFT && p.len_k > p.len_q) &&
                 !(kMask == FLASH_CUTLASS_CAUSAL_BOTTOM_RIGHT && p.len_q > p.len_k) &&
                 !(kMask == FLASH_CUTLASS_CAUSAL_FOLDED && (p.len_k % 128 || p.len_q % p.len_k));
  if (!reached) {
    snprintf(err, err_len, "backward needs non-empty sizes and every key visible to some row (top-left causal: "
             "len_k <= len_q; bottom-right: len_q <= len_k; folded: len_k a multiple of 128 dividing len_q); got "
             "len_q=%d len_k=%d mask=%d", p.len_q, p.len_k, kMask);
    return 2;
  }
  // lse, delta and the dQ accumulator are [batch, heads, len_q(, head_dim)] float32, contiguous.
  constexpr int kElems = 16 / int(sizeof(Element));
  for (auto [ptr, s] : {std::pair{p.q, p.q_stride}, std::pair{p.k, p.k_stride}, std::pair{p.v, p.v_stride},
                        std::pair{p.dout, p.dout_stride}, std::pair{static_cast<void const*>(p.dk), p.dk_stride},
                        std::pair{static_cast<void const*>(p.dv), p.dv_stride}}) {
    if (!tma_aligned(ptr, s, kElems)) {
      snprintf(err, err_len, "a tensor is not 16-byte aligned (address or batch/head/row stride)");
      return 2;
    }
  }
  for (void const* ptr : {static_cast<void const*>(p.lse), static_cast<void const*>(p.delta),
                          static_cast<void const*>(p.dq_acc)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 || rows % 4) {
      snprintf(err, err_len, "lse, delta and the dQ accumulator need 16-byte-aligned rows (len_q a multiple of 4)");
      return 2;
    }
  }
  Operation op;
  return launch(op, args, p.stream, p.head_dim, p.len_q, kElems, err, err_len);
}

}  // namespace flash_cutlass

#define FLASH_CUTLASS_BWD_INSTANCE(DTYPE, HEAD_DIM, MASK, BIAS, DROPOUT) \
  template int flash_cutlass::run_bwd<DTYPE, HEAD_DIM, MASK, BIAS, DROPOUT>(FlashCutlassBwdParams const&, char*, int);
