// The C ABI of the backward libraries (libflash_cutlass_bwd.so, libflash_cutlass_bwd_dropout.so;
// csrc/bwd_kernel.cuh) and flash_inductor/backends/cutlass.py's ctypes mirror of it.
//
// Apart from flash_cutlass.h so that a change to the backward's parameters does not re-key (and
// rebuild) the forward libraries, whose cache keys hash flash_cutlass.h.
#pragma once
#include "flash_cutlass.h"

#ifdef __cplusplus
extern "C" {
#endif

// The backward (libflash_cutlass_bwd.so, csrc/bwd_kernel.cuh). Grouped KV heads come folded into
// the rows as in the forward (heads = KV heads, len_q = groups * query length, mask
// CAUSAL_FOLDED under causal). delta and the zeroed dQ accumulator come from the caller.
typedef struct {
  const void* q;     // [batch, heads, len_q, head_dim], last dim contiguous
  const void* k;     // [batch, heads, len_k, head_dim]
  const void* v;     // [batch, heads, len_k, head_dim]
  const void* dout;  // [batch, heads, len_q, head_dim]
  const float* lse;    // [batch, heads, len_q], contiguous: the forward's lse times log2(e), +inf where it is -inf
  const float* delta;  // [batch, heads, len_q], contiguous: rowsum(dout * out) - dlse
  float* dq_acc;       // [batch, heads, len_q, head_dim], contiguous, zeroed: dQ is added in
  void* dk;            // [batch, heads, len_k, head_dim]
  void* dv;            // [batch, heads, len_k, head_dim]
  int32_t batch, heads, len_q, len_k, head_dim;
  // Element strides of batch, head and row (the head_dim stride is 1).
  int64_t q_stride[3], k_stride[3], v_stride[3], dout_stride[3], dk_stride[3], dv_stride[3];
  float scale;
  int32_t sm_count;
  void* stream;  // cudaStream_t
  // The forward's additive bias (no gradient), as FlashCutlassFwdParams reads it: NULL for none,
  // else [batch, query heads, rows_per_head, len_k] in q's dtype through element strides of
  // batch, query head and query row (0 on broadcast dims), key stride 1; grouped KV heads
  // folded as there (row r of KV head h: query head h * groups + r / rows_per_head).
  const void* bias;
  int64_t bias_stride[3];
  int32_t groups;
  int32_t rows_per_head;
  // The bias gradient: NULL for none, else [batch, query heads, rows_per_head, len_k] in q's dtype
  // through element strides of batch, query head and query row (key stride 1; address and strides
  // 16-byte aligned), written with dS (unscaled) for every score, zeros where a causal mask skips
  // a tile; the caller reduces broadcast dims. Needs `bias`.
  void* dbias;
  int64_t dbias_stride[3];
  // Dropout (the instances built with it: libflash_cutlass_bwd_dropout.so), as the forward drew
  // it (FlashCutlassFwdParams): dropout_p = 0 for none, `seed` the op's seed tensor on the device,
  // `drop_threshold` round(p * 2^16), below 2^16 (p < 1 - 2^-17). The kernel regenerates the forward's keep bits
  // (dropout_philox.h); the draw is keyed by batch * (heads * groups) + query head. With
  // dropout, `lse` and `delta` come with 1 / (1-p) folded in: lse - log2(1 / (1-p)) and
  // delta * (1-p) (the preprocess's keep_scale), which saves the kernel a multiply per score.
  const int64_t* seed;
  float dropout_p;
  uint32_t drop_threshold;
} FlashCutlassBwdParams;

// 0 on success; otherwise a message in `err`, as flash_cutlass_fwd.
int flash_cutlass_bwd(int32_t dtype, int32_t mask, const FlashCutlassBwdParams* params, char* err, int32_t err_len);

#ifdef __cplusplus
}
#endif
