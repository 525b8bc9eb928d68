// The C ABI of the Ampere-class (sm_80) CUTLASS library: forward and backward with an additive
// bias and its gradient, top-left and bottom-right causal, dropout and packed variable-length
// batches. Mirrored field for field by flash_inductor/backends/cutlass_sm80.py (ctypes).
//
// The kernels are CUTLASS's example 41 (the memory-efficient attention kernels, from the
// nvidia-cutlass wheel, used as a library); this library instantiates them per dtype and head
// dim and launches them. Like flash_cutlass.h it depends on neither torch nor Python.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Shared with flash_cutlass.h: FLASH_CUTLASS_FP16 = 0, FLASH_CUTLASS_BF16 = 1.
// mask: 0 none, 1 causal top-left, 2 causal bottom-right (len_q <= len_k).

typedef struct {
  const void* q;  // [batch, heads, len_q, head_dim] through element strides of batch, head, row
  const void* k;  // [batch, heads, len_k, head_dim]
  const void* v;  // [batch, heads, len_k, head_dim_v]
  void* out;      // [batch, len_q, heads, head_dim_v], contiguous (rows of heads * head_dim_v)
  // [batch, heads, lse_len], contiguous, lse_len = len_q rounded up to 32: natural-log sum of
  // exp(scores); +inf past len_q (the backward reads whole blocks).
  float* lse;
  float* out_accum;  // float32 [rows, heads, head_dim_v] where the instance needs one (rows as out)
  int32_t batch, heads, len_q, len_k, head_dim, head_dim_v;
  int64_t q_stride[3], k_stride[3], v_stride[3];
  float scale;
  int32_t mask;
  // Additive bias in q's dtype, [batch, heads, len_q, len_k] through element strides (0 on
  // broadcast dims; the key stride is 1); NULL for none. Strides and base 16-byte aligned.
  const void* bias;
  int64_t bias_stride[3];
  // Packed variable-length batch: int32 [batch + 1] row offsets into q (and k, v) rows, which are
  // then [total, heads, head_dim] (the batch stride unused); len_q / len_k are the longest.
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  // Dropout: keep probability 1 - dropout_p; the Philox seed and offset are read on the device
  // from seed_offset[0] and [1] (so a CUDA graph replays a fresh draw).
  float dropout_p;
  const int64_t* seed_offset;
  void* stream;  // cudaStream_t
} FlashCutlassSm80FwdParams;

typedef struct {
  const void* q;
  const void* k;
  const void* v;
  const void* out;   // as the forward wrote it: [batch, len_q, heads, head_dim_v]
  const void* dout;  // [batch, heads, len_q, head_dim_v] through dout_stride (rows 16-byte aligned)
  const float* lse;  // [batch, heads, lse_len] as the forward wrote it
  float* delta;      // scratch [batch, heads, delta_len]; packed: [heads, delta_len]
  int64_t delta_len; // a multiple of 8: lse_len, or for a packed batch its rows plus 128
  void* dq;          // [batch, len_q, heads, head_dim] contiguous
  void* dk;          // [batch, len_k, heads, head_dim]
  void* dv;          // [batch, len_k, heads, head_dim_v]
  void* dbias;       // NULL, or [batch, heads, len_q, dbias_row] in q's dtype, never broadcast
  int64_t dbias_row;
  void* workspace;   // flash_cutlass_sm80_bwd_workspace() bytes, zeroed when it says so
  int32_t batch, heads, len_q, len_k, head_dim, head_dim_v;
  int64_t q_stride[3], k_stride[3], v_stride[3], dout_stride[3];
  float scale;
  int32_t mask;
  const void* bias;
  int64_t bias_stride[3];
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  float dropout_p;
  const int64_t* seed_offset;
  int32_t num_splits_key;  // key-block splits run in parallel (clamped to 1..ceil(len_k / block)); 0 = choose
  int32_t sm_count;
  void* stream;
} FlashCutlassSm80BwdParams;

// 0 on success; otherwise a message in `err` (NUL-terminated, at most err_len bytes).
int flash_cutlass_sm80_fwd(int32_t dtype, const FlashCutlassSm80FwdParams* params, char* err, int32_t err_len);
int flash_cutlass_sm80_bwd(int32_t dtype, FlashCutlassSm80BwdParams* params, char* err, int32_t err_len);

// Bytes of float32 out_accum the forward needs per query row (0: none), and the backward's
// workspace in bytes (after choosing num_splits_key, which it writes back); *zero set to 1 when
// the workspace must be zero-filled. Negative on an unsupported dtype / head dim.
int64_t flash_cutlass_sm80_fwd_accum_bytes(int32_t dtype, const FlashCutlassSm80FwdParams* params);
int64_t flash_cutlass_sm80_bwd_workspace(int32_t dtype, FlashCutlassSm80BwdParams* params, int32_t* zero);

// The instances this library was built with, one "dtype/head_dim_bucket" per line.
const char* flash_cutlass_sm80_instances(void);

#ifdef __cplusplus
}
#endif
