// TORCH_CHECK for CUTLASS example 41's `check_supported` (host code returning bool): keep the
// first failed check's message for the caller, then return false.
#pragma once

namespace flash_cutlass_sm80 {
inline thread_local const char* failed_check = nullptr;
}  // namespace flash_cutlass_sm80

#define TORCH_CHECK(COND, MSG)                          \
  if (!(COND)) {                                        \
    ::flash_cutlass_sm80::failed_check = MSG;           \
    return false;                                       \
  }
