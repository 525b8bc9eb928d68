# Makes csrc/ the package flash_inductor.csrc in a wheel, so the CUDA sources travel with it
# (they are compiled on the user's machine: flash_inductor/cutlass_build.py).
