"""cProfile of the host side of one Triton attention call (BERT-base shape): which Python costs.

    python benchmarks/profile_launch.py
"""

import cProfile
import pstats

import torch

from flash_inductor.inputs import validate
from flash_inductor.kernels import triton_attention

q, k, v = (torch.randn(8, 12, 512, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
inp = validate(q, k, v, torch.zeros(8, 1, 1, 512, device="cuda", dtype=torch.bfloat16))
for _ in range(20):
    triton_attention.forward(inp, None)
torch.cuda.synchronize()
prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    triton_attention.forward(inp, None)
torch.cuda.synchronize()
prof.disable()
pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
