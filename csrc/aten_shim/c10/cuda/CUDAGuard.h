// Not c10: see ../../ATen/cuda/CUDAGeneratorImpl.h (nothing from it is used).
#pragma once
