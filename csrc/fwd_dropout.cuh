// Dropout in the Hopper forward (the instances of libflash_cutlass_dropout.so): every key tile's
// probabilities are multiplied by the keep bits of the Triton kernels' Philox draw
// (dropout_philox.h), after the row sums have taken them undropped, and the output is scaled by
// 1 / (1 - p) where the example normalises it (its rp_dropout). So lse is the undropped one, as
// the op's contract says, and the Triton backward, or any later CUDA one, regenerates this mask
// from the seed tensor alone (docs/design.md §4).
//
// `DropoutFusion<Inner>` wraps the fusion an instance would have without dropout (a mask, or a
// mask and the softmax-read bias): the trip counts and masking are Inner's, and the softmax below
// runs Inner's softmax and then drops. Both consumer loops that call the softmax (example 88's,
// and the TMA-bias loop of fwd_bias_tma.cuh) get it that way, unchanged.
//
// The draw: one Philox call per (row, 32-key span) of a thread's accumulator. The wgmma
// accumulator gives a thread, per row, exactly the 8 keys 32a + 8w + 2c + e (w = 0..3, e = 0..1)
// that one call of the Triton layout covers, so nothing moves between threads.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "collective/fmha_collective_softmax.hpp"

#include "dropout_philox.h"

namespace flash_cutlass {

struct DropoutArgs {
  int64_t const* seed = nullptr;  // the op's seed tensor on the device: Philox key, offset
  uint32_t threshold = 0;         // round(p * 2^16): a 16-bit draw below it drops its score
  float keep_scale = 1.f;         // 1 / (1 - p)
  int heads_q = 1;                // query heads: the draw is keyed by b * heads_q + query head
  int groups = 1, rows_per_head = 0;  // grouped KV heads folded into rows, as the bias reads them
};

template <class Inner>
struct DropoutFusion : Inner {};

template <bool kDropout, class Inner>
using DropoutIf = std::conditional_t<kDropout, DropoutFusion<Inner>, Inner>;

template <class F>
struct IsDropout : std::false_type {};
template <class Inner>
struct IsDropout<DropoutFusion<Inner>> : std::true_type {};

// The dropout arguments in the Params a softmax is given (defined in fwd_kernel.cuh, which
// knows both mainloops' Params).
template <class P>
CUTLASS_DEVICE DropoutArgs const& dropout_args(P const& params);

}  // namespace flash_cutlass

namespace cutlass::fmha::collective {

template <class Inner, class Params>
struct CollectiveSoftmax<float, flash_cutlass::DropoutFusion<Inner>, Params> : CollectiveSoftmax<float, Inner, Params> {
  using Base = CollectiveSoftmax<float, Inner, Params>;

  // Per thread and block, set on the first tile: the seed's words and the draw's key words of the
  // thread's two rows (b * heads_q + query head, position in the head).
  bool started_ = false;
  uint64_t seed_ = 0;
  uint32_t offset_ = 0, threshold_ = 0;
  uint32_t bh_[2] = {0, 0}, row_[2] = {0, 0};

  CUTLASS_DEVICE CollectiveSoftmax(Params const& params) : Base(params) {}

  // Zero the dropped probabilities of the tile whose accumulator is `acc_qk` (exponentials, row
  // sums already taken). Element i = e + 2h + 4j of a thread's wgmma accumulator is row h's key
  // 8j + e from the thread's first (row, key 2c) of the tile: for j = 4a + w, word w of the call
  // for (row, span a, c), half e.
  template <class AccQK, class CountQK>
  CUTLASS_DEVICE void drop(AccQK& acc_qk, CountQK const& count_qk) {
    constexpr int kElems = decltype(size(acc_qk))::value;
    static_assert(kElems % 16 == 0, "a thread's accumulator must hold whole 32-key spans of its two rows");
    if (!started_) {
      flash_cutlass::DropoutArgs const& d = flash_cutlass::dropout_args(this->params);
      seed_ = uint64_t(d.seed[0]);
      offset_ = flash_dropout::fold_offset(d.seed[1]);
      threshold_ = d.threshold;
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        // IndividualTileScheduler launches (row blocks, batch, KV heads).
        int row = get<0>(count_qk(2 * h)), head = int(blockIdx.z);
        if (d.groups > 1) {
          head = head * d.groups + row / d.rows_per_head;
          row = row % d.rows_per_head;
        }
        bh_[h] = uint32_t(int(blockIdx.y) * d.heads_q + head);
        row_[h] = uint32_t(row);
      }
      started_ = true;
    }
    int key0 = get<1>(count_qk(0));  // tile start (a multiple of 32) + 2c
    uint32_t span0 = uint32_t(key0) / 32u, c = (uint32_t(key0) % 8u) / 2u;
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
      CUTLASS_PRAGMA_UNROLL
      for (int a = 0; a < kElems / 16; ++a) {
        flash_dropout::Words r = flash_dropout::philox(seed_, 4u * (span0 + a) + c, row_[h], bh_[h], offset_);
        CUTLASS_PRAGMA_UNROLL
        for (int w = 0; w < 4; ++w) {
          int i = 2 * h + 16 * a + 4 * w;
          acc_qk(i) = (r.w[w] & 0xFFFFu) >= threshold_ ? acc_qk(i) : 0.f;
          acc_qk(i + 1) = (r.w[w] >> 16) >= threshold_ ? acc_qk(i + 1) : 0.f;
        }
      }
    }
  }

  template <class AccQK, class TiledMmaQK, class CountQK, class State, class ProblemShape>
  CUTLASS_DEVICE auto step(AccQK& acc_qk, TiledMmaQK const& tiled_mma_qk, CountQK const& count_qk, State& state,
                           ProblemShape const& problem_shape) {
    Base::step(acc_qk, tiled_mma_qk, count_qk, state, problem_shape);
    drop(acc_qk, count_qk);
  }

  template <bool kUseFusion = true, class AccQK, class TiledMmaQK, class CountQK, class State, class AccPV,
            class TiledMmaPV, class ProblemShape>
  CUTLASS_DEVICE auto step(AccQK& acc_qk, TiledMmaQK const& tiled_mma_qk, CountQK const& count_qk, State& state,
                           AccPV& acc_pv, TiledMmaPV const& tiled_mma_pv, ProblemShape const& problem_shape) {
    Base::template step<kUseFusion>(acc_qk, tiled_mma_qk, count_qk, state, acc_pv, tiled_mma_pv, problem_shape);
    drop(acc_qk, count_qk);  // on every tile, the mask's unmasked ones too
  }
};

}  // namespace cutlass::fmha::collective
