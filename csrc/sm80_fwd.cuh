// Ampere-class (sm_80) forward: CUTLASS example 41's memory-efficient attention kernel (from the
// nvidia-cutlass wheel, used as a library), instantiated per dtype and head-dim bucket, with
// bias, causal masks, dropout and packed variable-length batches passed through. One
// instantiation per translation unit (flash_inductor/cutlass_build.py generates them).
#pragma once

#include "sm80_common.cuh"
#include "kernel_forward.h"

namespace flash_cutlass_sm80 {

// Tile shapes per head-dim bucket: PyTorch's and xformers' choices for sm_80 (the output stays in
// registers up to 128; above, it is rescaled in a float32 buffer per key block).
template <int kDtype, int kMaxK>
struct Fwd {
  static constexpr int kQueries = kMaxK <= 128 ? 64 : 32;
  static constexpr int kKeys = kMaxK <= 64 ? 64 : 128;
  using Kernel = AttentionKernel<typename ElementOf<kDtype>::type, cutlass::arch::Sm80, /*isAligned=*/true, kQueries,
                                 kKeys, kMaxK <= 128 ? kMaxK : 65536, /*kSupportsDropout=*/true,
                                 /*kSupportsBias=*/true>;
};

template <int kDtype, int kMaxK>
int64_t fwd_accum_bytes(FlashCutlassSm80FwdParams const& p) {
  using Kernel = typename Fwd<kDtype, kMaxK>::Kernel;
  if (!Kernel::kNeedsOutputAccumulatorBuffer) return 0;
  return int64_t(p.heads) * p.head_dim_v * int64_t(sizeof(float));
}

template <int kDtype, int kMaxK>
int run_fwd(FlashCutlassSm80FwdParams const& a, char* err, int err_len) {
  using Kernel = typename Fwd<kDtype, kMaxK>::Kernel;
  using Element = typename ElementOf<kDtype>::type;
  typename Kernel::Params p;
  fill_shared(a, p);
  p.attn_bias_ptr = (Element*)a.bias;
  p.seqstart_q_ptr = (int32_t*)a.cu_seqlens_q;
  p.seqstart_k_ptr = (int32_t*)a.cu_seqlens_k;
  p.output_ptr = (Element*)a.out;
  if (Kernel::kNeedsOutputAccumulatorBuffer) {
    if (a.out_accum == nullptr) return fail(err, err_len, "out_accum: this head dim needs a float32 buffer");
    p.output_accum_ptr = a.out_accum;
  }
  p.logsumexp_ptr = a.lse;
  p.o_strideM = a.heads * a.head_dim_v;
  p.use_dropout = a.dropout_p > 0.f;
  p.dropout_prob = a.dropout_p;
  if (p.use_dropout) {
    if (a.seed_offset == nullptr) return fail(err, err_len, "dropout: no seed");
    p.rng_engine_inputs = at::PhiloxCudaState(a.seed_offset);
  }
  if (a.mask == 2 && a.len_q > a.len_k && a.cu_seqlens_q == nullptr)
    return fail(err, err_len, "bottom-right causal needs len_q <= len_k");
  if (!Kernel::check_supported(p)) return unsupported(err, err_len);
  return launch<Kernel>(attention_kernel_batched_impl<Kernel>, p, a.stream, err, err_len, "forward launch");
}

}  // namespace flash_cutlass_sm80

#define FLASH_CUTLASS_SM80_FWD(DTYPE, MAXK)                                                                      \
  template int flash_cutlass_sm80::run_fwd<DTYPE, MAXK>(FlashCutlassSm80FwdParams const&, char*, int);           \
  template int64_t flash_cutlass_sm80::fwd_accum_bytes<DTYPE, MAXK>(FlashCutlassSm80FwdParams const&);
