// The kernels' 16-bit elements: which CUTLASS type a dtype code means, and two of them packed
// in a 32-bit register, as the kernels load bias pairs.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cutlass/bfloat16.h"
#include "cutlass/half.h"
#include "flash_cutlass.h"

namespace flash_cutlass {

// The CUTLASS element of a FlashCutlassDtype (csrc/flash_cutlass.h).
template <int kDtype>
using ElementFor = std::conditional_t<kDtype == FLASH_CUTLASS_BF16, cutlass::bfloat16_t, cutlass::half_t>;

// (low half, high half) of `bits` as floats: the low half is the element at the lower address
// (a 32-bit load of two keys) or the first of a pair packed by hand.
template <class Element>
CUTLASS_DEVICE float2 unpack_pair(uint32_t bits) {
  if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
    return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
  } else {
    return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(bits >> 16))));
  }
}

}  // namespace flash_cutlass
