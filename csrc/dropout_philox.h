// The dropout keep bits of the Triton kernels (flash_inductor/kernels/triton_attention.py,
// `_dropout_keep` and `_load_philox`), for CUDA kernels that must draw the same mask: the op's
// backward regenerates a forward's mask, and a CUTLASS forward is followed by the Triton backward
// (docs/design.md §4 and §16). Plain C++ as well, so a CPU test checks it bit for bit against the
// Triton interpreter (tests/test_triton_kernels.py, test_dropout_philox_header_draws_the_triton_mask).
//
// The bit of (b·Hq + h, query row i, key j) is a pure function of the seed tensor: one
// Philox-4x32-10 call per (row, group of 8 keys), counters (group, row, b·Hq + h, offset), its four
// 32-bit words cut into eight 16-bit draws, each kept when >= p·2^16. Key j = 32a + 8w + 2c + e
// takes half e of word w of the call for group 4a + c: on Hopper's wgmma and Ampere's mma a thread
// holds exactly those 8 scores of a row (the column pairs 2c, 2c+1 of every 8-column chunk), so a
// thread draws for its own scores (`keep8`).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FLASH_DROPOUT_FN __host__ __device__ __forceinline__
#else
#define FLASH_DROPOUT_FN inline
#endif

namespace flash_dropout {

struct Words {
  uint32_t w[4];
};

// Philox-4x32 with 10 rounds as triton.language.philox runs it: the key is the seed's low and high
// 32-bit words; the round and key constants are Philox's. Each round's two products are taken
// whole (one 32 x 32 -> 64-bit multiply gives both halves: one IMAD.WIDE on the GPU, where the
// draw runs beside the tensor cores and every instruction counts).
FLASH_DROPOUT_FN Words philox(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = uint64_t(0xCD9E8D57u) * c2, p2 = uint64_t(0xD2511F53u) * c0;
    c0 = uint32_t(p0 >> 32) ^ c1 ^ k0;
    c2 = uint32_t(p2 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p0);
    c3 = uint32_t(p2);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Words{{c0, c1, c2, c3}};
}

// The op's seed tensor holds two int64 words: the Philox key, and an offset folded to 32 bits
// (the fourth counter word), as `_load_philox` reads them.
FLASH_DROPOUT_FN uint32_t fold_offset(int64_t offset) { return uint32_t(offset ^ (offset >> 32)); }

// The 8 keep bits of one call: bit 2w + e is key 32a + 8w + 2c + e of the row. `drop_threshold`
// is the Triton kernels' round(p · 2^16), computed by the caller (Python's rounding).
FLASH_DROPOUT_FN uint32_t keep8(uint64_t seed, uint32_t offset, uint32_t bh, uint32_t row, uint32_t a, uint32_t c,
                                uint32_t drop_threshold) {
  Words r = philox(seed, 4 * a + c, row, bh, offset);
  uint32_t bits = 0;
  for (int w = 0; w < 4; ++w) {
    bits |= uint32_t((r.w[w] & 0xFFFFu) >= drop_threshold) << (2 * w);
    bits |= uint32_t((r.w[w] >> 16) >= drop_threshold) << (2 * w + 1);
  }
  return bits;
}

// One score's keep bit (for reference and tests; kernels draw a call's 8 at once with keep8).
FLASH_DROPOUT_FN bool keep(uint64_t seed, uint32_t offset, uint32_t bh, uint32_t row, uint32_t key,
                           uint32_t drop_threshold) {
  uint32_t a = key / 32, w = (key % 32) / 8, c = (key % 8) / 2, e = key % 2;
  return (keep8(seed, offset, bh, row, a, c, drop_threshold) >> (2 * w + e)) & 1u;
}

}  // namespace flash_dropout
