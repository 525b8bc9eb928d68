// Host-side steps every CUTLASS instance takes before and at its launch (fwd_kernel.cuh,
// bwd_kernel.cuh): the TMA alignment check and the launch through example 88's Universal.
#pragma once

#include <cstdint>
#include <cstdio>

#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"

namespace flash_cutlass {

// TMA needs 16-byte-aligned bases and batch/head/row strides; a bad descriptor is only printed by
// CUTLASS and the kernel then faults, so instances refuse first (the Python side copies such
// tensors before calling).
inline bool tma_aligned(void const* ptr, int64_t const* stride, int elems_per_16_bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && stride[0] % elems_per_16_bytes == 0 &&
         stride[1] % elems_per_16_bytes == 0 && stride[2] % elems_per_16_bytes == 0;
}

// can_implement, the shared-memory attribute, initialize and run; 0, or 2 / 3 with `err` set.
template <class Operation>
int launch(Operation& op, typename Operation::Arguments const& args, void* stream, int head_dim, int len_q,
           int elems_per_16_bytes, char* err, int err_len) {
  using Kernel = typename Operation::Kernel;
  if (op.can_implement(args) != cutlass::Status::kSuccess) {
    snprintf(err, err_len, "CUTLASS cannot implement head_dim=%d len_q=%d (both must be multiples of %d)", head_dim,
             len_q, elems_per_16_bytes);
    return 2;
  }
  // Universal sets the shared-memory limit once per process; the attribute is per device, so a
  // second GPU would launch without it. Setting it on every call costs about a microsecond.
  cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       int(Kernel::SharedStorageSize));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cutlass::Status status = op.initialize(args, nullptr, s);
  if (status == cutlass::Status::kSuccess) status = op.run(s);
  if (status != cutlass::Status::kSuccess) {
    snprintf(err, err_len, "CUTLASS launch failed: %s (%s)", cutlassGetStatusString(status),
             cudaGetErrorString(cudaGetLastError()));
    return 3;
  }
  return 0;
}

}  // namespace flash_cutlass
