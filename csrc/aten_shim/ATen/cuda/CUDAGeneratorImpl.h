// Not ATen: the two names CUTLASS's example 41 kernels take from ATen when HAS_PYTORCH is
// defined (their switch for dropout), so the sm_80 library builds without torch's headers
// (docs/design.md §16). The Philox seed and offset are always read on the device, which is what
// lets a CUDA graph replay draw a fresh mask (the seed tensor is refilled before each replay).
#pragma once
#include <cstdint>
#include <tuple>

namespace at {

struct PhiloxCudaState {
  PhiloxCudaState() = default;
  // The kernels default-construct with (0, 0); such a state is never unpacked (no dropout).
  __host__ __device__ PhiloxCudaState(uint64_t, uint64_t) {}
  __host__ __device__ explicit PhiloxCudaState(const int64_t* seed_offset) : seed_offset_(seed_offset) {}
  const int64_t* seed_offset_ = nullptr;
};

namespace cuda {
namespace philox {
__host__ __device__ inline std::tuple<uint64_t, uint64_t> unpack(PhiloxCudaState const& s) {
  return std::make_tuple(static_cast<uint64_t>(s.seed_offset_[0]), static_cast<uint64_t>(s.seed_offset_[1]));
}
}  // namespace philox
}  // namespace cuda

}  // namespace at
