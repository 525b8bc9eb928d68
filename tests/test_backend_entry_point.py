"""`torch.compile(fn, backend="flash")` in an interpreter that never imported flash_inductor: the
backend is found through the `torch_dynamo_backends` entry point in pyproject.toml, and it
rewrites the attention in fn."""

from __future__ import annotations

import json
import subprocess
import sys

# Run in a fresh interpreter so no test (or conftest) has imported flash_inductor already.
_SCRIPT = r"""
import json, sys
import torch

def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v

q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
imported_before = "flash_inductor" in sys.modules
out = torch.compile(attention, backend="flash")(q, k, v)
torch.testing.assert_close(out, attention(q, k, v), rtol=1e-5, atol=1e-6)

from torch._dynamo.utils import counters
import flash_inductor  # noqa: F401  (only now, after the compiled call)
print(json.dumps({
    "imported_before": imported_before,
    "rewritten": counters["flash_inductor"]["rewritten"],
    "skipped": counters["flash_inductor"]["skipped"],
}))
"""


def test_flash_backend_found_without_import():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"imported_before": False, "rewritten": 1, "skipped": 0}, result
