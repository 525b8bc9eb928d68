// What the Ampere-class (sm_80) forward and backward units share: the element type per dtype
// code, the ATen stand-ins the example 41 kernels need for dropout, and error reporting.
#pragma once

#include <cstdint>
#include <cstdio>
#include <type_traits>

// The example 41 kernels compile their dropout only under HAS_PYTORCH; csrc/aten_shim supplies
// the two ATen names they then use, so nothing of torch is included or linked.
#ifndef HAS_PYTORCH
#define HAS_PYTORCH
#endif
#include "flash_cutlass_check.h"

#include "cutlass/arch/arch.h"
#include "cutlass/bfloat16.h"
#include "cutlass/half.h"

#include "flash_cutlass.h"
#include "flash_cutlass_sm80.h"

namespace flash_cutlass_sm80 {

template <int kDtype>
struct ElementOf;
template <>
struct ElementOf<FLASH_CUTLASS_FP16> {
  using type = cutlass::half_t;
};
template <>
struct ElementOf<FLASH_CUTLASS_BF16> {
  using type = cutlass::bfloat16_t;
};

inline int fail(char* err, int err_len, const char* what) {
  snprintf(err, err_len, "%s", what);
  return 2;
}

// check_supported's first failed check, as our error string.
inline int unsupported(char* err, int err_len) {
  snprintf(err, err_len, "the kernel refused the input: %s",
           failed_check ? failed_check : "(no message)");
  failed_check = nullptr;
  return 2;
}

inline int launch_error(cudaError_t e, char* err, int err_len, const char* what) {
  if (e == cudaSuccess) return 0;
  snprintf(err, err_len, "%s: %s", what, cudaGetErrorString(e));
  return 3;
}

// What the forward's and the backward's Params share, under the same names: q/k/v and their
// strides, the bias strides, sizes, scale and mask. `Args` is either C ABI struct.
template <class Params, class Args>
void fill_shared(Args const& a, Params& p) {
  using Element = typename std::remove_pointer<decltype(p.query_ptr)>::type;
  p.query_ptr = (Element*)a.q;
  p.key_ptr = (Element*)a.k;
  p.value_ptr = (Element*)a.v;
  p.scale = a.scale;
  p.head_dim = a.head_dim;
  p.head_dim_value = a.head_dim_v;
  p.num_queries = a.len_q;
  p.num_keys = a.len_k;
  p.num_heads = a.heads;
  p.num_batches = a.batch;
  p.custom_mask_type = uint8_t(a.mask);
  p.q_strideB = a.q_stride[0];
  p.q_strideH = int32_t(a.q_stride[1]);
  p.q_strideM = int32_t(a.q_stride[2]);
  p.k_strideB = a.k_stride[0];
  p.k_strideH = int32_t(a.k_stride[1]);
  p.k_strideM = int32_t(a.k_stride[2]);
  p.v_strideB = a.v_stride[0];
  p.v_strideH = int32_t(a.v_stride[1]);
  p.v_strideM = int32_t(a.v_stride[2]);
  p.bias_strideB = a.bias_stride[0];
  p.bias_strideH = a.bias_stride[1];
  p.bias_strideM = int32_t(a.bias_stride[2]);
}

// Launch `kernel` for `p` with the kernel's shared storage; the attribute is per device, so it is
// set on every call (a second GPU would otherwise refuse the launch).
template <class Kernel, class Params>
int launch(void (*kernel)(Params), Params const& p, void* stream, char* err, int err_len, const char* what) {
  int smem = int(sizeof(typename Kernel::SharedStorage));
  if (smem > 0xc000) {
    int e = launch_error(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), err,
                         err_len, "cudaFuncSetAttribute");
    if (e) return e;
  }
  kernel<<<p.getBlocksGrid(), p.getThreadsGrid(), smem, (cudaStream_t)stream>>>(p);
  return launch_error(cudaGetLastError(), err, err_len, what);
}

}  // namespace flash_cutlass_sm80
