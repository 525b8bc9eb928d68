// Dropout in the Hopper backward (the instances of libflash_cutlass_bwd_dropout.so): the
// forward's keep bits (dropout_philox.h) redrawn by the load warpgroup's two spare warps, for the
// consumers of csrc/bwd_kernel.cuh (BwdMainloop<..., kDropout = true>), which read one 32-bit
// word per thread and tile from a ring in shared memory and apply it to P and dP
// (docs/design.md §16). Included by the dropout units only: a change here re-keys only their
// library.
#pragma once

#include <cstdint>

#include "cutlass/arch/reg_reconfig.h"
#include "cutlass/pipeline/pipeline.hpp"

#include "bwd_kernel.cuh"
#include "dropout_philox.h"

// A measurement probe, never built by a library (benchmarks/cutlass_bwd_time.py --variant builds
// it): the draw without Philox (its words from the counters by one multiply each; a wrong mask),
// so a timing shows what the Philox rounds cost beside the rest of dropout's work.
#ifndef FLASH_CUTLASS_BWD_DROPOUT_PROBE_NO_DRAW
#define FLASH_CUTLASS_BWD_DROPOUT_PROBE_NO_DRAW 0
#endif

// Where the draw keeps the Philox round keys: 0, in registers, which needs the load warpgroup at
// 56 registers and leaves the consumers 224; 1, in shared memory (written once per CTA, read two
// rounds at a time by volatile loads), so the load warpgroup keeps the example's 24 and the
// consumers their 240. Measured in one run (H100, N=8192, p = 0.1, session 24): 360 / 284
// TFLOP/s (no mask / causal) in registers, 289 / 247 in shared memory (the loads' latency sits
// in the rounds' chain, and 24 registers still spill). benchmarks/cutlass_bwd_time.py --variant
// times both.
#ifndef FLASH_CUTLASS_BWD_DROPOUT_KEYS_IN_SMEM
#define FLASH_CUTLASS_BWD_DROPOUT_KEYS_IN_SMEM 0
#endif

namespace flash_cutlass {

// dropout_philox.h's Philox with the seed's round keys made once, not added up in every call
// (the same words): the draw is bound by the integer pipes of the two SMSPs its warps run on,
// and the keys' 20 additions a call were a quarter of its instructions (H100, N=8192: 301 -> 359
// TFLOP/s with them kept in registers; session 24).
struct RoundKeys {
  uint32_t k0[10], k1[10];
};

CUTLASS_DEVICE RoundKeys round_keys(uint64_t seed) {
  RoundKeys keys;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  CUTLASS_PRAGMA_UNROLL
  for (int round = 0; round < 10; ++round) {
    keys.k0[round] = k0;
    keys.k1[round] = k1;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return keys;
}

CUTLASS_DEVICE flash_dropout::Words philox_with_keys(RoundKeys const& keys, uint32_t c0, uint32_t c1, uint32_t c2,
                                                     uint32_t c3) {
  CUTLASS_PRAGMA_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = uint64_t(0xCD9E8D57u) * c2, p2 = uint64_t(0xD2511F53u) * c0;
    c0 = uint32_t(p0 >> 32) ^ c1 ^ keys.k0[round];
    c2 = uint32_t(p2 >> 32) ^ c3 ^ keys.k1[round];
    c1 = uint32_t(p0);
    c3 = uint32_t(p2);
  }
  return flash_dropout::Words{{c0, c1, c2, c3}};
}

// The same with the keys in shared memory at `keys` ([k0, k1] of each round): volatile loads, so
// neither the compiler nor ptxas hoists them out of the caller's loop into registers.
CUTLASS_DEVICE flash_dropout::Words philox_with_smem_keys(uint32_t keys, uint32_t c0, uint32_t c1, uint32_t c2,
                                                          uint32_t c3) {
  CUTLASS_PRAGMA_UNROLL
  for (int round = 0; round < 10; round += 2) {
    uint32_t k[4];
    asm volatile("ld.volatile.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(k[0]), "=r"(k[1]), "=r"(k[2]), "=r"(k[3]) : "r"(keys + 8u * uint32_t(round)));
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < 2; ++s) {
      uint64_t p0 = uint64_t(0xCD9E8D57u) * c2, p2 = uint64_t(0xD2511F53u) * c0;
      c0 = uint32_t(p0 >> 32) ^ c1 ^ k[2 * s];
      c2 = uint32_t(p2 >> 32) ^ c3 ^ k[2 * s + 1];
      c1 = uint32_t(p0);
      c3 = uint32_t(p2);
    }
  }
  return flash_dropout::Words{{c0, c1, c2, c3}};
}

// Dropout, run by the load warpgroup's warps 2 and 3 (`thread_idx` 0-63; example 88's kernel
// leaves them idle in the backward): for each query block the consumers take, in their order,
// the keep bits of the CTA's 64 x 128 tile into a keep stage. The Philox layout
// (dropout_philox.h) puts key 32a + 8w + 2c + e of a query row in half e of word w of the call
// (row, 4a + c). In the consumers' Sᵀ accumulator, thread `lane` of warp W holds keys
// 16W + lane / 4 (+ 8) of queries 2 (lane % 4) (+ 1) of every 8: so the calls of one
// (warpgroup, W / 2, c, lane % 4) feed exactly the 4 consumer threads W = 2 (W / 2) + {0, 1},
// lane = 8c + 4e + lane % 4, and use all 8 draws of each. One such group per thread here: 16
// calls per block (the forward's count per score), 4 words out, no thread draws a bit twice.
// On the consumers this draw would cost 2-4x the forward's work per score, inside their turn.
//
// Registers decide its speed (H100, N=8192, p = 0.1, session 24). The consumers lose about a
// quarter below the example's 240 registers each (the draw replaced by a cheap hash: 520 TFLOP/s
// at 240, 396-400 at 224 or 232), but the draw in the load warpgroup's 24 spills or waits on its
// keys (289); with its round keys in registers at 56 (consumers 224) it runs 357-367, the best
// measured. Either way it stays lean: the bits leave as bytes, one pair of j at a time (one
// register, not four words), the ring's barriers are used directly (no pointers kept), and the
// threshold comes from the kernel's parameters.
template <class Mainloop, class BlkCoord, class ProblemShape>
CUTLASS_DEVICE void draw_keep(Mainloop& mainloop, BlkCoord const& blk_coord, typename Mainloop::Params const& params,
                              ProblemShape const& problem_size, typename Mainloop::KeepState& state,
                              typename Mainloop::SharedStorage& storage, int thread_idx) {
  using TileShapeNM = typename Mainloop::TileShapeNM;
  using TileShape = typename Mainloop::TileShape;
  using Mask = typename Mainloop::MaskFusion;
  constexpr int kKeepWords = Mainloop::kKeepWords;
  static_assert(Mainloop::kWithDropout);
  static_assert(get<0>(TileShapeNM{}) == 64 && get<1>(TileShapeNM{}) == 64 && kKeepWords == 256,
                "the draw's layout assumes 64 x 64 tiles per consumer warpgroup, two warpgroups");
  BwdDropoutArgs const& d = params.dropout;
#if FLASH_CUTLASS_BWD_DROPOUT_KEYS_IN_SMEM
  // Each draw warp writes the keys (lanes 0-19) and the offset (lane 20), the same words the other
  // warp writes, and reads only after its own writes (__syncwarp).
  uint32_t keys = cute::cast_smem_ptr_to_uint(storage.keep_keys.data());
  if (int lane = thread_idx % 32; lane <= 20) {
    uint32_t word = lane == 20 ? flash_dropout::fold_offset(d.seed[1])
                               : uint32_t(uint64_t(d.seed[0]) >> (32 * (lane % 2))) +
                                     uint32_t(lane / 2) * (lane % 2 ? 0xBB67AE85u : 0x9E3779B9u);
    asm volatile("st.volatile.shared.u32 [%0], %1;\n" ::"r"(keys + 4u * uint32_t(lane)), "r"(word));
  }
  __syncwarp();
#else
  uint32_t offset = flash_dropout::fold_offset(d.seed[1]);
  RoundKeys keys = round_keys(uint64_t(d.seed[0]));
#endif
  int qq = thread_idx % 4, c = (thread_idx / 4) % 4, half = (thread_idx / 16) % 2, wg = thread_idx / 32;
  int n_block = get<1>(blk_coord);
  uint32_t group = 4u * uint32_t(4 * n_block + 2 * wg + half) + uint32_t(c);
  int bh0 = get<2, 0>(blk_coord) * d.heads_q + get<2, 1>(blk_coord) * d.groups;  // the KV head's first query head
  // Consumer thread (W = 2 half + w2, lane = 8c + 4e + qq) reads word 32 w2 + 4 e from here.
  uint32_t words_at = cute::cast_smem_ptr_to_uint(storage.smem_keep.data()) +
                      4u * uint32_t(wg * 128 + 64 * half + 8 * c + qq);
  int count = mainloop.get_inner_tile_count(blk_coord, problem_size);
  for (int q_block = 0; count > 0; ++q_block, --count) {
    if (!Mask{}.is_contributing(make_coord(q_block, n_block), TileShape{}, problem_size)) continue;
    storage.keep_pipeline.empty_barrier_[state.index()].wait(state.phase());
    uint32_t at = words_at + 4u * uint32_t(state.index() * kKeepWords);
    // The block's first row as (query head, position): grouped KV heads fold G heads into rows.
    int first = q_block * get<1>(TileShapeNM{}) + 2 * qq, head0 = 0;
    if (d.groups > 1) {
      head0 = first / d.rows_per_head;
      first -= head0 * d.rows_per_head;
    }
    CUTLASS_PRAGMA_UNROLL
    for (int jp = 0; jp < 4; ++jp) {
      uint32_t bytes = 0;  // byte 2 w2 + e: bits 8 jp .. 8 jp + 7 of consumer word (w2, e)
      CUTLASS_PRAGMA_UNROLL
      for (int jj = 0; jj < 2; ++jj) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          int row = first + 8 * (2 * jp + jj) + h, head = head0;
          if (d.groups > 1) {
            while (row >= d.rows_per_head) {
              row -= d.rows_per_head;
              head += 1;
            }
          }
#if FLASH_CUTLASS_BWD_DROPOUT_PROBE_NO_DRAW
          flash_dropout::Words r{{group * 0x9E3779B9u, uint32_t(row) * 0x85EBCA6Bu, uint32_t(bh0 + head), 0u}};
#elif FLASH_CUTLASS_BWD_DROPOUT_KEYS_IN_SMEM
          uint32_t offset;
          asm volatile("ld.volatile.shared.u32 %0, [%1];\n" : "=r"(offset) : "r"(keys + 80u));
          flash_dropout::Words r = philox_with_smem_keys(keys, group, uint32_t(row), uint32_t(bh0 + head), offset);
#else
          flash_dropout::Words r = philox_with_keys(keys, group, uint32_t(row), uint32_t(bh0 + head), offset);
#endif
          CUTLASS_PRAGMA_UNROLL
          for (int w = 0; w < 4; ++w) {
            // A half x of word w is kept when x >= threshold: the high half compares the word
            // whole against threshold << 16, the low half the word shifted up (no extraction).
            int bit = h + 2 * (w % 2) + 4 * jj;  // the consumer's score: query h + 8j, key + 8 (w % 2)
            bytes |= (r.w[w] << 16) >= d.high_threshold ? 1u << (8 * (2 * (w / 2)) + bit) : 0u;
            bytes |= r.w[w] >= d.high_threshold ? 1u << (8 * (2 * (w / 2) + 1) + bit) : 0u;
          }
        }
      }
      // volatile, as the consumers' load: the barriers' asm carries no memory clobber, so plain
      // stores could move across the wait above or the arrive below.
      CUTLASS_PRAGMA_UNROLL
      for (int b = 0; b < 4; ++b) {
        asm volatile("st.shared.u8 [%0], %1;\n" ::"r"(at + 4u * uint32_t(32 * (b / 2) + 4 * (b % 2)) + uint32_t(jp)),
                     "r"((bytes >> (8 * b)) & 0xFFu));
      }
    }
    storage.keep_pipeline.full_barrier_[state.index()].arrive();
    ++state;
  }
}

// The load warpgroup's registers: the example's 24 (the consumers keep 240 each) with the round
// keys in shared memory; 56 (the consumers get 224) to hold them in registers. 24 or 40 without
// the round keys at all: 289 / 302 TFLOP/s (session 24).
#ifndef FLASH_CUTLASS_BWD_DROPOUT_LOAD_REGISTERS
#define FLASH_CUTLASS_BWD_DROPOUT_LOAD_REGISTERS (FLASH_CUTLASS_BWD_DROPOUT_KEYS_IN_SMEM ? 24 : 56)
#endif

// Example 88's warp-specialised kernel with one role added: in the load warpgroup, warps 2 and 3
// (idle in the example's backward: Q loads with K and V, and the backward's epilogue loads
// nothing) draw the dropout keep bits (`draw_keep` above) into a ring the consumer warpgroups
// read, and the register split gives them more. Everything else is the example's kernel: roles,
// pipelines, the epilogue in the warpgroups' turn order (its wait runs unconditionally there too).
template <class Mainloop, class Epilogue, class TileScheduler>
struct BwdDropoutKernel : cutlass::fmha::kernel::FmhaKernelTmaWarpSpecialized<Mainloop, Epilogue, TileScheduler> {
  using Base = cutlass::fmha::kernel::FmhaKernelTmaWarpSpecialized<Mainloop, Epilogue, TileScheduler>;
  using typename Base::Params;
  using typename Base::SharedStorage;
  using typename Base::MainloopPipelineInner;
  using typename Base::MainloopPipelineOuter;
  using typename Base::MainloopPipelineReducer;
  using typename Base::PipelineStateInner;
  using typename Base::PipelineStateOuter;
  using typename Base::PipelineStateReducer;
  using typename Base::MathWarpGroupOrderBarrier;
  using typename Base::ClusterShape;
  using Base::NumMmaWarpGroups;
  using KeepPipeline = typename Mainloop::KeepPipeline;
  using KeepState = typename Mainloop::KeepState;
  static_assert(NumMmaWarpGroups == 2 && size(ClusterShape{}) == 1, "the backward's two consumers, no cluster");
  // The register split (FLASH_CUTLASS_BWD_DROPOUT_LOAD_REGISTERS above: 56 for the load
  // warpgroup, which now draws, and 224 for each consumer warpgroup; the example's is 24 / 240).
  static constexpr uint32_t kLoadRegisters = FLASH_CUTLASS_BWD_DROPOUT_LOAD_REGISTERS;
  static constexpr uint32_t kMmaRegisters =
      ((Base::TotalRegisterSupply - kLoadRegisters) / NumMmaWarpGroups / 8) * 8;
  static_assert(kLoadRegisters % 8 == 0 && kLoadRegisters >= 24 && kMmaRegisters <= 256);
  static constexpr int kDrawThreads = 2 * cutlass::NumThreadsPerWarp;

  CUTLASS_DEVICE void operator()(Params const& params, char* smem) {
#if defined(CUTLASS_ARCH_MMA_SM90A_ENABLED)
    enum class Role { Reducer = 0, Load = 1, Draw = 2, Epilogue = 3 };  // warps of the load warpgroup
    TileScheduler tile_scheduler{params.tile_scheduler};
    auto& storage = *reinterpret_cast<SharedStorage*>(smem);
    int warp_idx = cutlass::canonical_warp_idx_sync();
    int warp_group_idx = cutlass::canonical_warp_group_idx();
    bool load_group = warp_group_idx == 0;
    auto role = Role(warp_idx % cutlass::NumWarpsPerWarpGroup);
    bool draws = load_group && (role == Role::Draw || role == Role::Epilogue);
    int consumer_idx = warp_group_idx - 1;
    int lane_predicate = cute::elect_one_sync();

    if (warp_idx == 0 && lane_predicate) Mainloop::prefetch_tma_descriptors(params.mainloop);

    typename MainloopPipelineOuter::Params outer_params;
    outer_params.transaction_bytes = Mainloop::kOuterLoadBytes;
    outer_params.is_leader = lane_predicate && role == Role::Load;
    outer_params.num_consumers = cutlass::NumThreadsPerWarpGroup;
    typename MainloopPipelineInner::Params inner_params;
    inner_params.transaction_bytes = Mainloop::kInnerLoadBytes;
    inner_params.is_leader = lane_predicate && role == Role::Load;
    inner_params.num_consumers = NumMmaWarpGroups * cutlass::NumThreadsPerWarpGroup;
    typename MainloopPipelineReducer::Params reducer_params;
    reducer_params.producer_arv_count = NumMmaWarpGroups * cutlass::NumThreadsPerWarpGroup;
    reducer_params.consumer_arv_count = cutlass::NumThreadsPerWarp;
    typename KeepPipeline::Params keep_params;
    keep_params.producer_arv_count = kDrawThreads;
    keep_params.consumer_arv_count = NumMmaWarpGroups * cutlass::NumThreadsPerWarpGroup;
    using EpiLoadPipeline = typename Epilogue::LoadPipeline;
    typename EpiLoadPipeline::Params epi_params;
    if (load_group) {
      if (role == Role::Epilogue) epi_params.role = EpiLoadPipeline::ThreadCategory::Producer;
      if (role == Role::Load) {
        inner_params.role = MainloopPipelineInner::ThreadCategory::Producer;
        outer_params.role = MainloopPipelineOuter::ThreadCategory::Producer;
      }
      if (role == Role::Reducer) reducer_params.role = MainloopPipelineReducer::ThreadCategory::Consumer;
      if (draws) keep_params.role = KeepPipeline::ThreadCategory::Producer;
    } else {
      inner_params.role = MainloopPipelineInner::ThreadCategory::Consumer;
      outer_params.role = MainloopPipelineOuter::ThreadCategory::Consumer;
      reducer_params.role = MainloopPipelineReducer::ThreadCategory::Producer;
      epi_params.role = EpiLoadPipeline::ThreadCategory::Consumer;
      keep_params.role = KeepPipeline::ThreadCategory::Consumer;
    }
    MainloopPipelineOuter pipeline_outer(storage.pipeline_storage_outer, outer_params, Shape<_1, _1, _1>{});
    MainloopPipelineInner pipeline_inner(storage.pipeline_storage_inner, inner_params, ClusterShape{});
    MainloopPipelineReducer pipeline_reducer(storage.pipeline_storage_reducer, reducer_params);
    KeepPipeline pipeline_keep(storage.tensors.mainloop.keep_pipeline, keep_params);  // initialises the ring's barriers

    PipelineStateInner read_inner;
    PipelineStateInner write_inner = cutlass::make_producer_start_state<MainloopPipelineInner>();
    PipelineStateOuter read_outer;
    PipelineStateOuter write_outer = cutlass::make_producer_start_state<MainloopPipelineOuter>();
    PipelineStateReducer read_reducer;
    PipelineStateReducer write_reducer = cutlass::make_producer_start_state<MainloopPipelineReducer>();
    KeepState read_keep;
    KeepState write_keep = cutlass::make_producer_start_state<KeepPipeline>();

    typename MathWarpGroupOrderBarrier::Params order_params;
    order_params.group_id = consumer_idx;
    order_params.group_size = cutlass::NumThreadsPerWarpGroup;
    MathWarpGroupOrderBarrier math_wg_order_barrier(storage.math_wg_order, order_params);

    epi_params.dst_blockid = cute::block_rank_in_cluster();
    epi_params.producer_arv_count = cutlass::NumThreadsPerWarp;
    epi_params.consumer_arv_count = cutlass::NumThreadsPerWarpGroup;
    epi_params.transaction_bytes = Epilogue::TmaTransactionBytes;
    EpiLoadPipeline epi_load_pipeline(storage.epi_load, epi_params);

    __syncthreads();  // the barriers' initialisation, seen by every thread

    Mainloop mainloop;
    if (load_group) {
      cutlass::arch::warpgroup_reg_dealloc<kLoadRegisters>();
      if (role == Role::Load) {
        for (; tile_scheduler.is_valid(); ++tile_scheduler) {
          mainloop.template load_kv_maybe_q<true>(cute::block_rank_in_cluster(), tile_scheduler.get_block_coord(),
                                                  params.mainloop, params.problem_size, pipeline_inner, write_inner,
                                                  pipeline_outer, write_outer, storage.tensors.mainloop,
                                                  storage.load_warp_barrier, false);
        }
      } else if (role == Role::Reducer) {
        for (; tile_scheduler.is_valid(); ++tile_scheduler) {
          mainloop.reduce(tile_scheduler.get_block_coord(), params.mainloop, params.problem_size, pipeline_reducer,
                          read_reducer, storage.tensors.mainloop);
        }
      } else {
        for (; tile_scheduler.is_valid(); ++tile_scheduler) {
          draw_keep(mainloop, tile_scheduler.get_block_coord(), params.mainloop, params.problem_size, write_keep,
                             storage.tensors.mainloop,
                             int(threadIdx.x) - int(Role::Draw) * cutlass::NumThreadsPerWarp);
        }
      }
    } else {
      cutlass::arch::warpgroup_reg_alloc<kMmaRegisters>();
      for (; tile_scheduler.is_valid(); ++tile_scheduler) {
        auto blk_coord = tile_scheduler.get_block_coord();
        auto wg_coord = blk_coord;
        constexpr int kOuterLoads = Mainloop::kOuterLoads;
        read_outer.advance(consumer_idx * kOuterLoads);
        get<1>(wg_coord) = NumMmaWarpGroups * get<1>(wg_coord) + consumer_idx;
        auto result = mainloop.compute(blk_coord, wg_coord, params.mainloop, params.problem_size, pipeline_inner,
                                       read_inner, pipeline_outer, read_outer, pipeline_reducer, write_reducer,
                                       storage.tensors.mainloop, math_wg_order_barrier, &read_keep);
        read_outer.advance(kOuterLoads * (NumMmaWarpGroups - consumer_idx));
        math_wg_order_barrier.wait();
        Epilogue epilogue;
        epilogue(typename Mainloop::TileShapePV{}, wg_coord, result, typename Mainloop::TiledMmaPV{},
                 params.problem_size, params.epilogue, epi_load_pipeline, storage.tensors.epilogue[consumer_idx]);
        math_wg_order_barrier.arrive();
      }
    }
#endif
  }
};

}  // namespace flash_cutlass
