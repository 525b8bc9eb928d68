// Ampere-class (sm_80) backward: CUTLASS example 41's memory-efficient attention backward (from
// the nvidia-cutlass wheel, used as a library), with the bias gradient, causal masks, dropout
// (the forward's mask regenerated from the same seed) and packed variable-length batches.
// One instantiation per translation unit (flash_inductor/cutlass_build.py generates them).
#pragma once

#include <algorithm>

#include "sm80_common.cuh"
#include "kernel_backward.h"

namespace flash_cutlass_sm80 {

// Block shapes per head-dim bucket, as the example's own heuristic picks them for sm_80: up to
// 128 the dK/dV accumulators stay in registers and the next GEMM's operands are preloaded.
template <int kDtype, int kMaxK, bool kDropout>
struct Bwd {
  static constexpr int kBlockI = kMaxK > 64 ? 128 : 64;
  static constexpr bool kInRF = kMaxK <= kBlockI;
  static constexpr int kBlockJ = kInRF && kMaxK > 64 ? 128 : 64;
  using Kernel = AttentionBackwardKernel<cutlass::arch::Sm80, typename ElementOf<kDtype>::type, /*kIsAligned=*/true,
                                         kDropout, /*kPreload=*/kInRF, kBlockI, kBlockJ,
                                         kMaxK <= 128 ? kMaxK : 65536>;
};

template <class Kernel>
void fill_bwd(FlashCutlassSm80BwdParams const& a, typename Kernel::Params& p) {
  using Element = typename Kernel::scalar_t;
  fill_shared(a, p);
  p.bias_ptr = (Element*)a.bias;
  p.logsumexp_ptr = (float*)a.lse;
  p.output_ptr = (Element*)a.out;
  p.grad_output_ptr = (Element*)a.dout;
  p.delta_ptr = a.delta;
  p.cu_seqlens_q_ptr = (int32_t*)a.cu_seqlens_q;
  p.cu_seqlens_k_ptr = (int32_t*)a.cu_seqlens_k;
  p.grad_query_ptr = (Element*)a.dq;
  p.grad_key_ptr = (Element*)a.dk;
  p.grad_value_ptr = (Element*)a.dv;
  p.grad_bias_ptr = (Element*)a.dbias;
  p.workspace = (float*)a.workspace;
  p.gO_strideB = a.dout_stride[0];
  p.gO_strideH = a.dout_stride[1];
  p.gO_strideM = int32_t(a.dout_stride[2]);
  // out as the forward wrote it: [batch, len_q, heads, head_dim_v] (packed: [total, heads, dv]).
  p.o_strideH = a.head_dim_v;
  p.o_strideB = int64_t(a.len_q) * a.heads * a.head_dim_v;
  // lse: [batch, heads, lse_len] as the forward wrote it. delta: [batch, heads, delta_len]; a
  // packed batch indexes it from the packed row (batch 0), so there it is [heads, delta_len].
  int64_t lse_len = (int64_t(a.len_q) + 31) / 32 * 32;
  p.lse_strideH = lse_len;
  p.lse_strideB = lse_len * a.heads;
  p.delta_strideH = a.delta_len;
  p.delta_strideB = a.delta_len * a.heads;
  // Gradients: [batch, rows, heads, dim], contiguous.
  p.gQKV_strideM_multiplier = 1;
  p.gQ_strideH = a.head_dim;
  p.gK_strideH = a.head_dim;
  p.gV_strideH = a.head_dim_v;
  p.gQ_strideB = int64_t(a.len_q) * a.heads * a.head_dim;
  p.gK_strideB = int64_t(a.len_k) * a.heads * a.head_dim;
  p.gV_strideB = int64_t(a.len_k) * a.heads * a.head_dim_v;
  p.gB_strideM = int32_t(a.dbias_row);
  p.gB_strideH = a.dbias_row * a.len_q;
  p.gB_strideB = a.dbias_row * a.len_q * a.heads;
  p.dropout_prob = a.dropout_p;
  if (Kernel::kApplyDropout) p.rng_engine_inputs = at::PhiloxCudaState(a.seed_offset);
  p.num_splits_key = int16_t(std::max(1, a.num_splits_key));
}

template <int kDtype, int kMaxK, bool kDropout>
int64_t bwd_workspace(FlashCutlassSm80BwdParams& a, int32_t* zero) {
  using Kernel = typename Bwd<kDtype, kMaxK, kDropout>::Kernel;
  auto kernel = attention_kernel_backward_batched_impl<Kernel>;
  int smem = int(sizeof(typename Kernel::SharedStorage));
  if (a.num_splits_key <= 0) {
    // Split the key blocks of a (batch, head) over more programs until the GPU is full; each
    // split adds its dQ into a float32 workspace.
    int per_sm = 1;
    if (smem > 0xc000) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, int(Kernel::kNumThreads), smem);
    int64_t programs = int64_t(a.batch) * a.heads;
    int64_t want = (int64_t(std::max(per_sm, 1)) * std::max(a.sm_count, 1) + programs - 1) / programs;
    int64_t blocks = (int64_t(a.len_k) + Kernel::kBlockSizeJ - 1) / Kernel::kBlockSizeJ;
    a.num_splits_key = int32_t(std::max<int64_t>(1, std::min<int64_t>({want, blocks, 32767})));
  }
  // At most one split per key block (the kernel refuses more).
  int32_t blocks = int32_t((int64_t(a.len_k) + Kernel::kBlockSizeJ - 1) / Kernel::kBlockSizeJ);
  a.num_splits_key = std::max(1, std::min(a.num_splits_key, blocks));
  typename Kernel::Params p;
  fill_bwd<Kernel>(a, p);
  *zero = p.should_zero_workspace() ? 1 : 0;
  return p.workspace_size();
}

template <int kDtype, int kMaxK, bool kDropout>
int run_bwd(FlashCutlassSm80BwdParams& a, char* err, int err_len) {
  using Kernel = typename Bwd<kDtype, kMaxK, kDropout>::Kernel;
  if (kDropout && a.seed_offset == nullptr) return fail(err, err_len, "dropout: no seed");
  if (a.num_splits_key <= 0) return fail(err, err_len, "num_splits_key: call flash_cutlass_sm80_bwd_workspace first");
  typename Kernel::Params p;
  fill_bwd<Kernel>(a, p);
  if (p.workspace_size() && a.workspace == nullptr) return fail(err, err_len, "workspace: none given");
  if (!Kernel::check_supported(p)) return unsupported(err, err_len);
  return launch<Kernel>(attention_kernel_backward_batched_impl<Kernel>, p, a.stream, err, err_len,
                        "backward launch");
}

}  // namespace flash_cutlass_sm80

#define FLASH_CUTLASS_SM80_BWD(DTYPE, MAXK, DROPOUT)                                                             \
  template int flash_cutlass_sm80::run_bwd<DTYPE, MAXK, DROPOUT>(FlashCutlassSm80BwdParams&, char*, int);        \
  template int64_t flash_cutlass_sm80::bwd_workspace<DTYPE, MAXK, DROPOUT>(FlashCutlassSm80BwdParams&, int32_t*);
