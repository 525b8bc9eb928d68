// The Hopper forward with the bias tile loaded by TMA into shared memory, beside K and V.
//
// Why: the bias softmax of fwd_kernel.cuh reads the bias from global memory in the consumer
// warpgroups, between their two GEMMs, so its address arithmetic and load latency are tensor-core
// idle time (351 TFLOP/s at D=128 against 617 without a bias, H200, session 6). Here the producer
// warp loads each key tile's bias [128 query rows, 128 keys] by TMA into a slot of the K/V ring,
// so the ring carries K_t, bias_t, V_t per key tile, and a consumer adds its 64 rows from shared
// memory (one 32-bit load per key pair, conflict-free under the 128-byte swizzle).
//
// This is example 88's warp-specialised mainloop (FmhaMainloopTmaWarpSpecialized, from the
// nvidia-cutlass wheel) with our own producer (`load_kv_maybe_q`) and consumer (`compute`): the
// example's GEMM collectives, TMA loads of Q/K/V, softmax and epilogue are used as they are.
//
// Limits (checked by `bias_tma_ok` in flash_cutlass.h; anything else takes the softmax-read bias):
// a bias tile must be one K/V stage (head dim 128: 128 x 128 keys in q's dtype), its rows must not
// be broadcast (TMA cannot step a row stride of 0), and its base and strides must be 16-byte
// multiples. Grouped KV heads fold G query heads into the rows; a 128-row block then stays in one
// query head only when rows_per_head is a multiple of 128.
#pragma once

#include <cmath>
#include <cstdint>

#include "cutlass/cutlass.h"
#include "collective/fmha_collective_tma_warpspecialized.hpp"

// Tuning knobs, compile-time so benchmarks/cutlass_variants.py can build them side by side:
// how many key tiles past the one being loaded the producer asks L2 to fetch (the ring holds only
// two tiles ahead, and the bias, unlike K and V, comes from HBM), and whether a consumer issues its
// shared-memory bias loads before waiting for the QK GEMM (their latency hidden behind it).
#ifndef FLASH_CUTLASS_TMA_BIAS_L2_AHEAD
#define FLASH_CUTLASS_TMA_BIAS_L2_AHEAD 0
#endif
#ifndef FLASH_CUTLASS_TMA_BIAS_EARLY_LOADS
#define FLASH_CUTLASS_TMA_BIAS_EARLY_LOADS 1
#endif
// Whether a consumer reads its bias pairs with ldmatrix (8 LDSM.x4 from addresses computed once,
// the swizzle included) instead of 32 32-bit loads whose swizzled addresses are computed per tile;
// and whether the two consumer warpgroups take turns through bias + softmax (example 88's
// kIsMainloopLocked), so one's softmax overlaps the other's GEMMs.
#ifndef FLASH_CUTLASS_TMA_BIAS_LDSM
#define FLASH_CUTLASS_TMA_BIAS_LDSM 1
#endif
#ifndef FLASH_CUTLASS_TMA_BIAS_LOCKED
#define FLASH_CUTLASS_TMA_BIAS_LOCKED 0
#endif
// Whether a consumer overlaps one key tile's softmax with the GEMMs around it (FA3's
// intra-warpgroup pipelining: tile t's QK GEMM and tile t-1's PV GEMM are issued, then tile t's
// bias, max and exponentials run while the PV GEMM is still on the tensor cores; the output is
// rescaled once that GEMM is done). Written in session 19 after its device time was spent: not
// yet run on a GPU, so off by default (benchmarks/cutlass_variants.py's "overlap").
#ifndef FLASH_CUTLASS_TMA_BIAS_OVERLAP
#define FLASH_CUTLASS_TMA_BIAS_OVERLAP 0
#endif
// Diagnostics only (wrong results): load the bias but do not add it, to time the loads alone;
// load the block's first bias tile at every step (from L2 after the first), to tell HBM traffic
// from the ring's depth.
#ifndef FLASH_CUTLASS_TMA_BIAS_DIAG_NO_ADD
#define FLASH_CUTLASS_TMA_BIAS_DIAG_NO_ADD 0
#endif
#ifndef FLASH_CUTLASS_TMA_BIAS_DIAG_SAME_TILE
#define FLASH_CUTLASS_TMA_BIAS_DIAG_SAME_TILE 0
#endif

namespace flash_cutlass {

using namespace cute;

// The bias as TMA reads it: per (batch, query head) a [rows, keys] matrix with unit key stride.
// A broadcast batch or head dim has extent 1 and is read at coordinate 0.
struct TmaBiasArgs {
  void const* ptr = nullptr;
  int rows = 0, keys = 0, batches = 1, heads = 1;
  int64_t stride_b = 0, stride_h = 0, stride_q = 0;  // elements
  int groups = 1, rows_per_head = 0;                 // grouped KV heads folded into rows
  float inv_scale = 1.f;
};

// kBias = false: the same mainloop without a bias (only with the overlapped consumer: the ring
// carries K and V alone), so the no-bias instances can run FLASH_CUTLASS_TMA_BIAS_OVERLAP's loop
// (FLASH_CUTLASS_OVERLAP_NO_BIAS in fwd_kernel.cuh).
template <class Base, class Fusion, bool kBias = true>
struct TmaBiasMainloop : Base {
  using Element = typename Base::Element;
  using TileShape = typename Base::TileShape;
  using TileShapeQK = typename Base::TileShapeQK;
  using TileShapePV = typename Base::TileShapePV;
  using MainloopPipeline = typename Base::MainloopPipeline;
  using MainloopPipelineQ = typename Base::MainloopPipelineQ;
  using PipelineState = typename Base::PipelineState;
  using PipelineStateQ = typename Base::PipelineStateQ;

  static constexpr int kTileM = tuple_element_t<0, TileShape>::value;  // query rows of a block
  static constexpr int kTileN = tuple_element_t<1, TileShape>::value;  // keys of a tile
  static constexpr int kRowsPerWarpGroup = tuple_element_t<0, TileShapeQK>::value;
  static constexpr int kStages = Base::Stages::value;

  using StrideBias = cute::tuple<int64_t, _1, cute::tuple<int64_t, int64_t>>;  // row, key, (batch, head)
  using SmemLayoutBiasTile =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, make_shape(Int<kTileM>{}, Int<kTileN>{})));
  using SmemLayoutBias = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                                make_shape(Int<kTileM>{}, Int<kTileN>{}, Int<kStages>{})));
  // A bias tile takes one slot of the K/V ring: same bytes (the pipeline expects one transaction
  // size per slot) and the same stage stride (the slots are a union).
  static_assert(!kBias || size(SmemLayoutBiasTile{}) * sizeof(Element) == Base::kInnerLoadBytes,
                "the TMA bias needs a bias tile the size of a K tile (head dim = keys per tile)");
  static_assert(!kBias || cosize_v<SmemLayoutBias> == cosize_v<typename Base::SmemLayoutK>);
  static_assert(kBias || FLASH_CUTLASS_TMA_BIAS_OVERLAP, "the no-bias mode is the overlapped consumer's");

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<typename Base::SmemLayoutQ>> smem_q;
    union {
      cute::array_aligned<Element, cute::cosize_v<typename Base::SmemLayoutK>> smem_k;
      cute::array_aligned<Element, cute::cosize_v<typename Base::SmemLayoutV>> smem_v;
      cute::array_aligned<Element, cute::cosize_v<SmemLayoutBias>> smem_bias;
    };
  };

  static auto make_bias_tma(TmaBiasArgs const& b) {
    Tensor g = make_tensor(make_gmem_ptr(static_cast<Element const*>(b.ptr)),
                           make_layout(make_shape(b.rows, b.keys, make_shape(b.batches, b.heads)),
                                       StrideBias{b.stride_q, _1{}, make_tuple(b.stride_b, b.stride_h)}));
    return make_tma_copy(SM90_TMA_LOAD{}, g, SmemLayoutBiasTile{});
  }
  using TmaBias = decltype(make_bias_tma(std::declval<TmaBiasArgs>()));

  struct Arguments : Base::Arguments {
    float scale;
    TmaBiasArgs bias;
    DropoutArgs dropout;
  };

  // The softmax is handed these (compute below), so they hold the dropout's arguments too.
  struct Params : Base::Params {
    TmaBias tma_bias;
    TmaBiasArgs bias;
    DropoutArgs dropout;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_size, Arguments const& args, void* workspace) {
    auto base = Base::to_underlying_arguments(problem_size, args, workspace);
    // The example fixes the scale at 1/sqrt(head_dim); the op takes any (see ScaledMainloop).
    base.scale_softmax = args.scale;
    base.scale_softmax_log2 = args.scale * static_cast<float>(M_LOG2E);
    base.rp_dropout = args.dropout.keep_scale;  // the example's tail scales the output by it
    TmaBiasArgs bias = args.bias;
    bias.inv_scale = 1.f / args.scale;
    if constexpr (kBias) {
      return Params{base, make_bias_tma(bias), bias, args.dropout};
    } else {
      return Params{base, {}, bias, args.dropout};
    }
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    if constexpr (kBias) cute::prefetch_tma_descriptor(params.tma_bias.get_tma_descriptor());
  }

  // The producer warp: Q for each consumer warpgroup, then per key tile K_t, bias_t, V_t into
  // consecutive slots of the ring (the consumers release them in that order).
  template <bool kLoadQ, class BlkCoord, class ProblemShape, class LoadWarpBarrier>
  CUTLASS_DEVICE void load_kv_maybe_q(int block_rank_in_cluster, BlkCoord const& blk_coord, Params const& params,
                                      ProblemShape const& problem_size, MainloopPipeline& pipeline,
                                      PipelineState& smem_pipe_write, MainloopPipelineQ& pipeline_q,
                                      PipelineStateQ& smem_pipe_write_q, SharedStorage& storage, LoadWarpBarrier&,
                                      bool) {
    static_assert(kLoadQ, "built for the kernel's default: the K/V warp also loads Q");
    int tiles = Fusion{}.get_trip_count(blk_coord, TileShape{}, problem_size);
    int lane_predicate = cute::elect_one_sync();

    typename Base::LoadQ load_q{params.tma_load_q, pipeline_q, storage.smem_q};
    auto state_q = load_q.init_state(_0{}, problem_size, TileShapeQK{}, blk_coord, Base::NumMmaWarpGroups);
    auto q_iter = cute::make_coord_iterator(Int<Base::NumMmaWarpGroups>{});
    int q_count = Base::NumMmaWarpGroups;
    typename Base::LoadK load_k{params.tma_load_k, pipeline, storage.smem_k};
    auto state_k = load_k.init_state(block_rank_in_cluster, problem_size, TileShapeQK{}, blk_coord, tiles);
    typename Base::LoadV load_v{params.tma_load_v, pipeline, storage.smem_v};
    auto state_v = load_v.init_state(block_rank_in_cluster, problem_size, TileShapePV{}, blk_coord, tiles);

    // This block's bias rows: the IndividualTileScheduler launches (row blocks, batch, KV heads).
    TmaBiasArgs const& b = params.bias;
    int row0 = get<0>(blk_coord) * kTileM, head = get<2, 1>(blk_coord);
    if (b.groups > 1) {
      head = head * b.groups + row0 / b.rows_per_head;
      row0 = row0 % b.rows_per_head;
    }
    Tensor mB = params.tma_bias.get_tma_tensor(make_shape(b.rows, b.keys, make_shape(b.batches, b.heads)));
    Tensor gB = local_tile(mB, make_shape(Int<kTileM>{}, Int<kTileN>{}), make_coord(_, _));  // (M,N,m,n,(B,H))
    Tensor gB_block = gB(_, _, row0 / kTileM, _,
                         make_coord(b.batches > 1 ? int(get<2, 0>(blk_coord)) : 0, b.heads > 1 ? head : 0));
    Tensor sB = make_tensor(make_smem_ptr(storage.smem_bias.data()), SmemLayoutBias{});
    auto bias_tma = params.tma_bias.get_slice(0);
    Tensor tBg = bias_tma.partition_S(gB_block);  // (TMA, TMA_M, TMA_N, key tiles)
    Tensor tBs = bias_tma.partition_D(sB);        // (TMA, TMA_M, TMA_N, stages)

    auto put = [&](auto const& tma, auto const& src, auto const& dst) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      copy(tma.with(*barrier), src, dst(_, _, _, smem_pipe_write.index()));
      ++smem_pipe_write;
    };

    constexpr int kAhead = FLASH_CUTLASS_TMA_BIAS_L2_AHEAD;
    load_q.step(q_iter, state_q, smem_pipe_write_q, lane_predicate, q_count);
    if (kBias && lane_predicate == 1) {
      CUTLASS_PRAGMA_UNROLL
      for (int t = 1; t < kAhead; ++t) {
        if (t < tiles) prefetch(params.tma_bias, tBg(_, _, _, t));
      }
    }
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 0; t < tiles; ++t) {
      if (lane_predicate == 1) {
        put(params.tma_load_k, get<0>(state_k)(_, _, _, t), get<1>(state_k));
        if constexpr (kBias) {
          put(params.tma_bias, tBg(_, _, _, FLASH_CUTLASS_TMA_BIAS_DIAG_SAME_TILE ? 0 : t), tBs);
          if (kAhead > 0 && t + kAhead < tiles) prefetch(params.tma_bias, tBg(_, _, _, t + kAhead));
        }
      }
      while (q_count > 0) load_q.step(q_iter, state_q, smem_pipe_write_q, lane_predicate, q_count);
      if (lane_predicate == 1) put(params.tma_load_v, get<0>(state_v)(_, _, _, t), get<1>(state_v));
    }
  }

  // The kernel's other producer roles, compiled for every mainloop. Q comes from the K/V warp
  // (the kernel's kLoadsQSeparately is off), so the Q warp's loop never runs; the forward has
  // nothing to reduce.
  template <class BlkCoord, class ProblemShape, class LoadWarpBarrier>
  CUTLASS_DEVICE void load_maybe_q(BlkCoord const&, Params const&, ProblemShape const&, MainloopPipelineQ&,
                                   PipelineStateQ&, SharedStorage&, LoadWarpBarrier&, bool) {}

  template <class BlkCoord, class ProblemShape, class PipelineReducer, class StateReducer>
  CUTLASS_DEVICE void reduce(BlkCoord const&, Params const&, ProblemShape const&, PipelineReducer&, StateReducer&,
                             SharedStorage&) {}

  // acc += bias / scale (the softmax exponentiates scale * acc). The wgmma accumulator gives each
  // thread pairs of adjacent keys, which the swizzle keeps adjacent: one 32-bit load per pair.
  template <int kPairs, class BiasTile>
  CUTLASS_DEVICE static void load_bias(uint32_t (&bits)[kPairs], BiasTile const& bias) {
    CUTLASS_PRAGMA_UNROLL
    for (int p = 0; p < kPairs; ++p) bits[p] = *reinterpret_cast<uint32_t const*>(&bias(2 * p));
  }

  template <class AccQK, int kPairs>
  CUTLASS_DEVICE static void add_bias(AccQK& acc_qk, uint32_t const (&bits)[kPairs], float inv_scale) {
    static_assert(kPairs * 2 == decltype(size(acc_qk))::value);
    if constexpr (!FLASH_CUTLASS_TMA_BIAS_DIAG_NO_ADD) {
      CUTLASS_PRAGMA_UNROLL
      for (int p = 0; p < kPairs; ++p) {
        float2 v = unpack_pair<Element>(bits[p]);
        acc_qk(2 * p) = fmaf(v.x, inv_scale, acc_qk(2 * p));
        acc_qk(2 * p + 1) = fmaf(v.y, inv_scale, acc_qk(2 * p + 1));
      }
    }
  }

  // After the last PV GEMM is issued: the output normalised and the lse. A row whose every key is
  // masked (a -inf bias) gets lse -inf and zeros, the op's contract (example 88 reports +inf).
  template <class Softmax, class SoftmaxState, class AccPV, class TiledMmaPV>
  CUTLASS_DEVICE static auto finish(Softmax& softmax, SoftmaxState& softmax_state, AccPV& acc_pv,
                                    TiledMmaPV const& tiled_mma_pv) {
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_pv);
    Tensor lse = softmax.tail(softmax_state, acc_pv, tiled_mma_pv);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(lse); i++) {
      if (lse(i) == INFINITY) lse(i) = -INFINITY;
    }
    return make_tuple(acc_pv, lse);
  }

  // FLASH_CUTLASS_TMA_BIAS_OVERLAP's consumer loop (see its comment). Per steady tile t: wait K_t
  // and bias_t, issue S_t = Q K_t^T, issue O += P_{t-1} V_{t-1}, wait for S_t only, add the bias,
  // mask, new row max and exponentials (P_t), wait for the PV GEMM, rescale O and the row sums,
  // release V_{t-1}, K_t, bias_t in ring order. O starts at zero and every PV GEMM accumulates,
  // so no wgmma sits behind a branch.
  template <class BlkCoord, class ProblemShape, class TiledMmaQK, class TiledMmaPV, class FragQ, class FragK,
            class FragV, class ReadBias, class CountQK, class AccPV, class Softmax, class SoftmaxState,
            class OrderBarrier>
  CUTLASS_DEVICE auto compute_overlapped(BlkCoord const& blk_coord, Params const& params,
                                         ProblemShape const& problem_size, MainloopPipeline& pipeline,
                                         PipelineState& smem_pipe_read, PipelineState& smem_pipe_release,
                                         TiledMmaQK& tiled_mma_qk, TiledMmaPV& tiled_mma_pv, FragQ const& tSrQ,
                                         FragK const& tSrK, FragV const& tOrV, ReadBias& read_bias, CountQK& tPcP,
                                         AccPV& acc_pv, Softmax& softmax, SoftmaxState& softmax_state, int unmasked,
                                         int tiles, OrderBarrier& math_wg_order_barrier) {
    using cutlass::fmha::collective::layout_acc_mn;
    using cutlass::fmha::collective::reduction_target_n;
    // This loop exponentiates itself instead of calling the softmax, so it has no dropout.
    static_assert(!IsDropout<Fusion>::value, "dropout runs the example's consumer loop, not the overlapped one");
    float const scale_log2 = params.scale_softmax_log2;
    float const inv_scale = params.bias.inv_scale;
    auto& s_max = get<0>(softmax_state);
    auto& a_sum = get<1>(softmax_state);
    Tensor m_prev = make_fragment_like(s_max);
    Tensor row_sum = make_fragment_like(a_sum);

    // Row max over this tile's scores, across the threads that share a row.
    auto take_max = [&](auto& acc_qk) {
      Tensor mn = make_tensor(acc_qk.data(), layout_acc_mn(tiled_mma_qk, acc_qk.layout()));
      auto red = reduction_target_n(tiled_mma_qk);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size<0>(mn); i++) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(mn); j++) s_max(i) = ::fmaxf(s_max(i), mn(i, j));
      }
      for_each(make_seq<decltype(rank(red))::value>{}, [&](auto r) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 1; j < shape<r>(red); j *= 2) {
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size<0>(mn); i++) {
            s_max(i) = ::fmaxf(s_max(i), __shfl_xor_sync(uint32_t(-1), s_max(i), stride<r>(red) * j));
          }
        }
      });
    };
    // P = exp2(scale_log2 * (s - max)); this thread's part of each row's sum (the tail adds the parts).
    auto exponentiate = [&](auto& acc_qk) {
      Tensor mn = make_tensor(acc_qk.data(), layout_acc_mn(tiled_mma_qk, acc_qk.layout()));
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size<0>(mn); i++) {
        float scaled_max = scale_log2 * (s_max(i) == -INFINITY ? 0.f : s_max(i));
        row_sum(i) = 0.f;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(mn); j++) {
          mn(i, j) = ::exp2f(scale_log2 * mn(i, j) - scaled_max);
          row_sum(i) += mn(i, j);
        }
      }
    };
    auto wait_qk_and_bias = [&](auto& acc_qk, auto first) {
      int k_stage = smem_pipe_read.index();
      pipeline.consumer_wait(smem_pipe_read);
      ++smem_pipe_read;
      int bias_stage = smem_pipe_read.index();
      if constexpr (kBias) {
        pipeline.consumer_wait(smem_pipe_read);
        ++smem_pipe_read;
      }
      if constexpr (decltype(first)::value) math_wg_order_barrier.wait();
      warpgroup_fence_operand(acc_qk);
      warpgroup_arrive();
      cutlass::fmha::collective::gemm_zero_acc(tiled_mma_qk, tSrQ, tSrK(_, _, _, k_stage), acc_qk);
      warpgroup_commit_batch();
      if constexpr (decltype(first)::value) math_wg_order_barrier.arrive();
      return bias_stage;
    };
    auto issue_pv = [&](auto& p, PipelineState const& v_state) {
      pipeline.consumer_wait(v_state);
      warpgroup_fence_operand(acc_pv);
      warpgroup_fence_operand(p);
      warpgroup_arrive();
      cute::gemm(tiled_mma_pv, p, tOrV(_, _, _, v_state.index()), acc_pv);
      warpgroup_commit_batch();
    };
    auto release = [&](int slots) {
      for (int i = 0; i < slots; ++i) {
        pipeline.consumer_release(smem_pipe_release);
        ++smem_pipe_release;
      }
    };

    clear(acc_pv);
    tiled_mma_pv.accumulate_ = GMMA::ScaleOut::One;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(s_max); i++) s_max(i) = -INFINITY;

    // The first tile: nothing to overlap with yet.
    Tensor acc_qk0 = partition_fragment_C(tiled_mma_qk, take<0, 2>(TileShapeQK{}));
    uint32_t bits[decltype(size(acc_qk0))::value / 2];
    int bias_stage = wait_qk_and_bias(acc_qk0, true_type{});
    if constexpr (kBias) read_bias(bits, bias_stage);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_qk0);
    if constexpr (kBias) add_bias(acc_qk0, bits, inv_scale);
    release(kBias ? 2 : 1);  // K_0 (and bias_0)
    Fusion{}.before_softmax(acc_qk0, tPcP, problem_size);
    take_max(acc_qk0);
    exponentiate(acc_qk0);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(a_sum); i++) a_sum(i) = row_sum(i);
    auto p = cutlass::fmha::collective::make_acc_into_op<Element>(acc_qk0, typename TiledMmaPV::LayoutA_TV{});
    PipelineState v_state = smem_pipe_read;  // V_0
    ++smem_pipe_read;
    tPcP.data() = tPcP.data() + E<1>{} * kTileN;

    auto steady = [&](auto masked) {
      Tensor acc_qk = partition_fragment_C(tiled_mma_qk, take<0, 2>(TileShapeQK{}));
      int bias_stage = wait_qk_and_bias(acc_qk, false_type{});
      issue_pv(p, v_state);
      if constexpr (kBias) read_bias(bits, bias_stage);
      warpgroup_wait<1>();  // the QK GEMM; the PV GEMM may still run
      warpgroup_fence_operand(acc_qk);
      if constexpr (kBias) add_bias(acc_qk, bits, inv_scale);
      if constexpr (decltype(masked)::value) Fusion{}.before_softmax(acc_qk, tPcP, problem_size);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(s_max); i++) m_prev(i) = s_max(i);
      take_max(acc_qk);
      exponentiate(acc_qk);
      warpgroup_wait<0>();  // the PV GEMM
      warpgroup_fence_operand(acc_pv);
      Tensor o = make_tensor(acc_pv.data(), layout_acc_mn(tiled_mma_pv, acc_pv.layout()));
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size<0>(o); i++) {
        float cur = s_max(i) == -INFINITY ? 0.f : s_max(i);
        float r = ::exp2f((m_prev(i) - cur) * scale_log2);
        a_sum(i) = a_sum(i) * r + row_sum(i);
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(o); j++) o(i, j) *= r;
      }
      release(kBias ? 3 : 2);  // V_{t-1}, K_t (and bias_t)
      Tensor p_next = cutlass::fmha::collective::make_acc_into_op<Element>(acc_qk, typename TiledMmaPV::LayoutA_TV{});
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(p); i++) p(i) = p_next(i);
      v_state = smem_pipe_read;  // V_t
      ++smem_pipe_read;
      tPcP.data() = tPcP.data() + E<1>{} * kTileN;
    };
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 1; t < unmasked; ++t) steady(false_type{});
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = std::max(unmasked, 1); t < tiles; ++t) steady(true_type{});

    issue_pv(p, v_state);
    return finish(softmax, softmax_state, acc_pv, tiled_mma_pv);
  }

  // A consumer warpgroup: its 64 query rows against every visited key tile. The example's loop,
  // with the bias slot between K and V: QK GEMM, bias added once the GEMM is done, softmax (the
  // mask fusion on the first tile and the masked ones), PV GEMM.
  template <class BlkCoord, class ProblemShape, class PipelineReducer, class StateReducer, class OrderBarrier>
  CUTLASS_DEVICE auto compute(BlkCoord const& blk_coord, BlkCoord const& wg_coord, Params const& params,
                              ProblemShape const& problem_size, MainloopPipeline& pipeline,
                              PipelineState& smem_pipe_read, MainloopPipelineQ& pipeline_q,
                              PipelineStateQ& smem_pipe_read_q, PipelineReducer&, StateReducer&,
                              SharedStorage& storage, OrderBarrier& math_wg_order_barrier) {
    int thread_idx = int(threadIdx.x);
    PipelineState smem_pipe_release = smem_pipe_read;

    typename Base::TiledMmaQK tiled_mma_qk;
    auto thr_mma_qk = tiled_mma_qk.get_thread_slice(thread_idx);
    Tensor sQ = make_tensor(make_smem_ptr(storage.smem_q.data()), typename Base::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(storage.smem_k.data()), typename Base::SmemLayoutK{});
    Tensor tSrQ = thr_mma_qk.make_fragment_A(thr_mma_qk.partition_A(sQ));
    Tensor tSrK = thr_mma_qk.make_fragment_B(thr_mma_qk.partition_B(sK));

    typename Base::TiledMmaPV tiled_mma_pv;
    auto thr_mma_pv = tiled_mma_pv.get_thread_slice(thread_idx);
    Tensor sV = make_tensor(make_smem_ptr(storage.smem_v.data()), typename Base::SmemLayoutV{});
    Tensor tOrV = thr_mma_pv.make_fragment_B(thr_mma_pv.partition_B(sV));

    // This warpgroup's rows of every bias slot, partitioned as the QK accumulator.
    Tensor sB = make_tensor(make_smem_ptr(storage.smem_bias.data()), SmemLayoutBias{});
    Tensor sB_rows = local_tile(sB, make_shape(Int<kRowsPerWarpGroup>{}, Int<kTileN>{}),
                                make_coord(int(get<0>(wg_coord)) % Base::NumMmaWarpGroups, _0{}));
    Tensor tSsB = thr_mma_qk.partition_C(sB_rows);  // (MMA, MMA_M, MMA_N, stages)
    // ldmatrix: LDSM.x4 number k reads keys [16k, 16k + 16) of this warp's 16 rows as four 8x8
    // matrices, (rows +0 / +8) x (keys +0 / +8); lane l gives row l % 8 of matrix l / 8 and gets
    // from matrix i the pair the wgmma accumulator puts in this thread, pair 4k + i. Addresses in
    // slot 0, swizzle included; a slot is a whole number of swizzle periods further.
    constexpr int kLdsm = kTileN / 16;
    static_assert(kTileN % 16 == 0 && kRowsPerWarpGroup == 64);
    constexpr uint32_t kSlotBytes = uint32_t(cosize_v<SmemLayoutBiasTile> * sizeof(Element));
    uint32_t ldsm_addr[kLdsm];
    if constexpr (FLASH_CUTLASS_TMA_BIAS_LDSM) {
      int lane = thread_idx % 32, warp = (thread_idx / 32) % 4, matrix = lane / 8;
      int row = warp * 16 + (matrix % 2) * 8 + lane % 8;
      Tensor slot0 = sB_rows(_, _, 0);
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kLdsm; ++k) {
        ldsm_addr[k] = cute::cast_smem_ptr_to_uint(&slot0(row, 16 * k + 8 * (matrix / 2)));
      }
    }
    auto read_bias = [&](uint32_t(&bits)[decltype(size(tSsB(_, _, _, 0)))::value / 2], int slot) {
      if constexpr (FLASH_CUTLASS_TMA_BIAS_LDSM) {
        static_assert(4 * kLdsm == decltype(size(tSsB(_, _, _, 0)))::value / 2);
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < kLdsm; ++k) {
          asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                       : "=r"(bits[4 * k]), "=r"(bits[4 * k + 1]), "=r"(bits[4 * k + 2]), "=r"(bits[4 * k + 3])
                       : "r"(ldsm_addr[k] + slot * kSlotBytes));
        }
      } else {
        load_bias(bits, tSsB(_, _, _, slot));
      }
    };

    Tensor cP = make_identity_tensor(take<0, 2>(TileShapeQK{}));
    Tensor tPcP = thr_mma_qk.partition_C(cP);
    tPcP.data() = tPcP.data() + E<0>{} * (int(get<0>(wg_coord)) * kRowsPerWarpGroup);

    Tensor acc_pv = partition_fragment_C(tiled_mma_pv, take<0, 2>(TileShapePV{}));
    cutlass::fmha::collective::CollectiveSoftmax<float, Fusion, decltype(params)> softmax{params};
    auto softmax_state = softmax.init(acc_pv, tiled_mma_pv);

    int unmasked = Fusion{}.get_unmasked_trip_count(blk_coord, TileShape{}, problem_size);
    int tiles = unmasked + Fusion{}.get_masked_trip_count(blk_coord, TileShape{}, problem_size);
    float inv_scale = params.bias.inv_scale;

    pipeline_q.consumer_wait(smem_pipe_read_q);
    int q_stage = smem_pipe_read_q.index();

    // Without a bias only the overlapped loop exists; the loop below is then never reached.
    if constexpr (FLASH_CUTLASS_TMA_BIAS_OVERLAP || !kBias) {
      return compute_overlapped(blk_coord, params, problem_size, pipeline, smem_pipe_read, smem_pipe_release,
                                tiled_mma_qk, tiled_mma_pv, tSrQ(_, _, _, q_stage), tSrK, tOrV, read_bias, tPcP,
                                acc_pv, softmax, softmax_state, unmasked, tiles, math_wg_order_barrier);
    }

    // One key tile. Peeled as the example peels it (first tile, unmasked tiles, masked tiles),
    // so every wgmma sits in straight-line code: a branch around one makes ptxas serialise it.
    auto tile = [&](auto first, auto masked) {
      constexpr bool kFirst = decltype(first)::value, kMasked = decltype(masked)::value;
      Tensor acc_qk = partition_fragment_C(tiled_mma_qk, take<0, 2>(TileShapeQK{}));
      pipeline.consumer_wait(smem_pipe_read);
      if constexpr (kFirst) math_wg_order_barrier.wait();
      warpgroup_fence_operand(acc_qk);
      warpgroup_arrive();
      cutlass::fmha::collective::gemm_zero_acc(tiled_mma_qk, tSrQ(_, _, _, q_stage),
                                               tSrK(_, _, _, smem_pipe_read.index()), acc_qk);
      warpgroup_commit_batch();
      if constexpr (kFirst) math_wg_order_barrier.arrive();
      ++smem_pipe_read;

      pipeline.consumer_wait(smem_pipe_read);  // this tile's bias
      int bias_stage = smem_pipe_read.index();
      ++smem_pipe_read;
      auto tok = pipeline.consumer_try_wait(smem_pipe_read);  // V

      uint32_t bits[decltype(size(acc_qk))::value / 2];
      if constexpr (FLASH_CUTLASS_TMA_BIAS_EARLY_LOADS) read_bias(bits, bias_stage);
      warpgroup_wait<0>();  // also the previous tile's PV GEMM
      warpgroup_fence_operand(acc_qk);
      warpgroup_fence_operand(acc_pv);
      if constexpr (FLASH_CUTLASS_TMA_BIAS_LOCKED) math_wg_order_barrier.wait();
      if constexpr (!FLASH_CUTLASS_TMA_BIAS_EARLY_LOADS) read_bias(bits, bias_stage);
      add_bias(acc_qk, bits, inv_scale);

      // Slots in ring order: V of the previous tile (its GEMM is done), K, then the bias just read.
      CUTLASS_PRAGMA_UNROLL
      for (int i = kFirst ? 1 : 0; i < 3; ++i) {
        pipeline.consumer_release(smem_pipe_release);
        ++smem_pipe_release;
      }

      if constexpr (kFirst) {
        softmax.step(acc_qk, tiled_mma_qk, tPcP, softmax_state, problem_size);
      } else {
        softmax.template step<kMasked>(acc_qk, tiled_mma_qk, tPcP, softmax_state, acc_pv, tiled_mma_pv,
                                       problem_size);
      }
      if constexpr (FLASH_CUTLASS_TMA_BIAS_LOCKED) math_wg_order_barrier.arrive();
      Tensor p = cutlass::fmha::collective::make_acc_into_op<Element>(acc_qk, typename Base::TiledMmaPV::LayoutA_TV{});

      pipeline.consumer_wait(smem_pipe_read, tok);
      warpgroup_fence_operand(acc_pv);
      warpgroup_fence_operand(p);
      warpgroup_arrive();
      if constexpr (kFirst) {
        cutlass::fmha::collective::gemm_zero_acc(tiled_mma_pv, p, tOrV(_, _, _, smem_pipe_read.index()), acc_pv);
      } else {
        cute::gemm(tiled_mma_pv, p, tOrV(_, _, _, smem_pipe_read.index()), acc_pv);
      }
      warpgroup_commit_batch();
      ++smem_pipe_read;
      tPcP.data() = tPcP.data() + E<1>{} * kTileN;
    };

    tile(true_type{}, true_type{});
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 1; t < unmasked; ++t) tile(false_type{}, false_type{});
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = std::max(unmasked, 1); t < tiles; ++t) tile(false_type{}, true_type{});

    return finish(softmax, softmax_state, acc_pv, tiled_mma_pv);
  }
};

}  // namespace flash_cutlass
