"""The dropout keep mask of the Triton kernels and csrc/dropout_philox.h, drawn in torch.

int64 arithmetic on any device, for any shape: the reference the GPU tests hold a CUDA forward's
dropout to bit for bit (test_triton_kernels._dropout_mask reads a kernel's mask off a run with
v = identity, which needs len_k <= the head dim). The layout is docs/design.md §4's: one
Philox-4x32-10 call per (b·Hq + h, query row, group of 8 keys), counters (group, row, b·Hq + h,
offset), key j = 32a + 8w + 2c + e taking half e of word w of the call for group 4a + c, kept when
that 16-bit draw is >= round(p · 2^16).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul_words(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a·b, for a < 2^32 (int64 tensor) and a constant b < 2^32: b is
    split in 16-bit halves so no partial product passes 2^49."""
    x, y = a * (b >> 16), a * (b & 0xFFFF)  # a·b = x·2^16 + y
    return (x + (y >> 16)) >> 16, (((x & 0xFFFF) << 16) + y) & _M32


def philox(key: int, c0, c1, c2, c3):
    """triton.language.philox's Philox-4x32-10 with `key` (64 bits) on broadcastable counters."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        hi0, lo0 = _mul_words(c2, 0xCD9E8D57)
        hi2, lo2 = _mul_words(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi0 ^ c1 ^ k0, lo0, hi2 ^ c3 ^ k1, lo2
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def keep_mask(seed: torch.Tensor, batch: int, heads_q: int, len_q: int, len_k: int, p: float,
              device=None) -> torch.Tensor:
    """[batch, heads_q, len_q, len_k] bool: which scores a forward with dropout `p` keeps, for the
    op's seed tensor (Philox key, offset)."""
    device = device or seed.device
    key, offset = (int(x) for x in seed.tolist()[:2])
    key %= 1 << 64
    offset = (offset ^ (offset >> 32)) & _M32  # fold_offset: the offset's two words xor-ed
    spans = -(-len_k // 32)
    bh = torch.arange(batch * heads_q, dtype=torch.int64, device=device)[:, None, None]
    rows = torch.arange(len_q, dtype=torch.int64, device=device)[None, :, None]
    groups = torch.arange(4 * spans, dtype=torch.int64, device=device)[None, None, :]
    words = torch.stack(philox(key, groups, rows, bh, torch.full_like(groups, offset)), -1)  # [BH, Nq, 4a + c, w]
    draws = torch.stack((words & 0xFFFF, words >> 16), -1)  # [..., w, e]
    draws = draws.view(batch * heads_q, len_q, spans, 4, 4, 2).permute(0, 1, 2, 4, 3, 5)  # [.., a, w, c, e]
    keep = draws.reshape(batch, heads_q, len_q, 32 * spans)[..., :len_k] >= round(p * (1 << 16))
    return keep
