// Not ATen: see CUDAGeneratorImpl.h beside this file.
#pragma once
#include "ATen/cuda/CUDAGeneratorImpl.h"
