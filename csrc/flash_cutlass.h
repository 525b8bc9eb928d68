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
  // Dropout on the probabilities (the instances built with it: libflash_cutlass_dropout.so):
  // dropout_p = 0 for none. `seed` is the op's seed tensor on the device (two int64 words: the
  // Philox key and the offset), read by the kernel, so a CUDA-graph replay of a fresh seed draws
  // a fresh mask; `drop_threshold` is round(p * 2^16). The keep bits are the Triton kernels'
  // (csrc/dropout_philox.h), so either backward regenerates this forward's mask.
  const int64_t* seed;
  float dropout_p;
  uint32_t drop_threshold;
} FlashCutlassFwdParams;

// Whether an instance that loads the bias by TMA can read this one ("/bias_tma" in the listing;
// otherwise the entry point takes the softmax-read instance of the head dim, where one is built:
// head dim 128 builds none, and the Python glue refuses or copies what this rejects): rows not
// broadcast (TMA cannot step a row stride of 0), a 16-byte-aligned base and 16-byte strides
// (2-byte elements), and with grouped KV heads a 128-row block of folded rows inside one query head.
static inline int flash_cutlass_bias_tma_ok(const FlashCutlassFwdParams* p) {
  const int64_t* s = p->bias_stride;
  return p->bias != 0 && s[2] != 0 && (uintptr_t)p->bias % 16 == 0 && s[0] % 8 == 0 && s[1] % 8 == 0 &&
         s[2] % 8 == 0 && p->groups >= 1 && p->rows_per_head >= 1 && (p->groups == 1 || p->rows_per_head % 128 == 0);
}

// 0 on success; otherwise a message in `err` (NUL-terminated, at most err_len bytes). A bias
// selects the instances built with one (params->bias != NULL), by TMA where flash_cutlass_bias_tma_ok.
int flash_cutlass_fwd(int32_t dtype, int32_t mask, const FlashCutlassFwdParams* params, char* err, int32_t err_len);

// How flash_cutlass_fwd would read this call's bias: 0 no bias, 1 in the softmax, 2 by TMA; -1 if
// no instance takes the call.
int flash_cutlass_bias_read(int32_t dtype, int32_t mask, const FlashCutlassFwdParams* params);

// The instances this library was built with, one "dtype/head_dim/mask[/bias[_tma]]" per line.
const char* flash_cutlass_instances(void);

#ifdef __cplusplus
}
#endif
