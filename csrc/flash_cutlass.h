// The C ABI between flash_inductor/backends/cutlass.py (ctypes) and the CUTLASS kernels.
//
// A plain C struct and one entry point, so the shared library depends on neither torch's C++ ABI
// nor Python: the same build serves every torch version (docs/design.md, "CUTLASS").
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum FlashCutlassDtype { FLASH_CUTLASS_FP16 = 0, FLASH_CUTLASS_BF16 = 1 };
// CAUSAL_FOLDED: top-left causal where the rows are G query heads stacked per KV head (grouped
// KV heads), row = g * len_k + position; needs len_q (= G * len_k) and len_k a multiple of 128.
enum FlashCutlassMask {
  FLASH_CUTLASS_NO_MASK = 0,
  FLASH_CUTLASS_CAUSAL_TOP_LEFT = 1,
  FLASH_CUTLASS_CAUSAL_BOTTOM_RIGHT = 2,
  FLASH_CUTLASS_CAUSAL_FOLDED = 3
};

typedef struct {
  const void* q;  // [batch, heads, len_q, head_dim], last dim contiguous
  const void* k;  // [batch, heads, len_k, head_dim]
  const void* v;  // [batch, heads, len_k, head_dim]
  void* out;      // [batch, heads, len_q, head_dim]
  float* lse;     // [batch, heads, len_q], contiguous: natural-log sum of exp(scale * q.k)
  int32_t batch, heads, len_q, len_k, head_dim;
  // Element strides of batch, head and row (the head_dim stride is 1).
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
  float scale;
  int32_t sm_count;
  void* stream;  // cudaStream_t
  // Additive bias in q's dtype, added to scale * q.k: NULL for none, else read as
  // [batch, query heads, rows_per_head, len_k] through element strides of batch, query head and
  // query row (0 on broadcast dims); the key stride is 1. Base address and strides even (keys
  // are read two at a time).
  const void* bias;
  int64_t bias_stride[3];
  // Query heads per KV head folded into the rows (grouped KV heads; 1 = none): row r of KV head
  // h is query head h * groups + r / rows_per_head, position r % rows_per_head.
  int32_t groups;
  int32_t rows_per_head;
} FlashCutlassFwdParams;

// 0 on success; otherwise a message in `err` (NUL-terminated, at most err_len bytes). A bias
// selects the instances built with one (params->bias != NULL).
int flash_cutlass_fwd(int32_t dtype, int32_t mask, const FlashCutlassFwdParams* params, char* err, int32_t err_len);

// The instances this library was built with, one "dtype/head_dim/mask[/bias]" per line.
const char* flash_cutlass_instances(void);

#ifdef __cplusplus
}
#endif
