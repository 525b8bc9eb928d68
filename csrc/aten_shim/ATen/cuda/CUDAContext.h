// Not ATen: see CUDAGeneratorImpl.h beside this file. The kernels' input checks report through
// TORCH_CHECK; here it records the message for the C ABI's error string and returns false.
#pragma once
#include "flash_cutlass_check.h"
