"""flash_inductor.kernel_analysis_cache: torch's per-launch analysis of our Triton kernels is
asked once per distinct (kernel, constexprs, scalars, tensor dtypes), other kernels pass through."""

import pytest
import torch
import triton
import triton.language as tl
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

from flash_inductor import kernel_analysis_cache as kac
from flash_inductor.kernels import triton_attention


@triton.jit
def _foreign_kernel(X, n, BLOCK: tl.constexpr):  # defined outside flash_inductor's modules
    tl.store(X + tl.arange(0, BLOCK), 0.0)


class _Analysis:
    """Stands in for torch's analysis: records each question, answers with a fresh list."""

    def __init__(self):
        self.asked = []

    def __call__(self, kernel, kwargs, tma_descriptor_metadata):
        self.asked.append((kernel, dict(kwargs)))
        return [name for name, v in kwargs.items() if isinstance(v, torch.Tensor)]


@pytest.fixture
def analysis():
    counters.clear()
    real = _Analysis()
    return real, kac.memoised(real)


def _args(fake, dtype=torch.bfloat16, n=128, block=64):
    return {"Q": fake.from_tensor(torch.empty(4, dtype=dtype)), "Nq": n, "scale": 0.125, "BLOCK_M": block, "Bias": None}


def test_our_kernel_is_analysed_once_per_key(analysis):
    real, cached = analysis
    fake = FakeTensorMode()
    first = cached(triton_attention._attn_fwd, _args(fake), {})
    # Another launch of the same kernel with other tensors of the same dtypes: no new analysis.
    again = cached(triton_attention._attn_fwd, _args(fake), {})
    assert len(real.asked) == 1 and first == again == ["Q"]
    again.append("mutated by a caller")
    assert cached(triton_attention._attn_fwd, _args(fake), {}) == ["Q"]  # each caller its own copy
    assert counters["flash_inductor"]["kernel_analysis_hits"] == 2
    assert counters["flash_inductor"]["kernel_analysis_misses"] == 1


@pytest.mark.parametrize("change", ["dtype", "scalar", "constexpr", "kernel"])
def test_what_the_ttir_depends_on_is_in_the_key(analysis, change):
    real, cached = analysis
    fake = FakeTensorMode()
    cached(triton_attention._attn_fwd, _args(fake), {})
    kernel, args = triton_attention._attn_fwd, _args(fake)
    if change == "dtype":
        args = _args(fake, dtype=torch.float16)
    elif change == "scalar":
        args = _args(fake, n=1)  # Triton specialises an int equal to 1
    elif change == "constexpr":
        args = _args(fake, block=128)
    else:
        kernel = triton_attention._attn_bwd_dq
    cached(kernel, args, {})
    assert len(real.asked) == 2


def test_symbolic_sizes_share_a_key(analysis):
    real, cached = analysis
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    fake = FakeTensorMode(shape_env=env)
    for hint in (128, 256):
        args = _args(fake)
        args["Nq"] = env.create_unbacked_symint()
        cached(triton_attention._attn_fwd, args, {})
    assert len(real.asked) == 1  # TTIR generation replaces every symbol with 2


def test_other_kernels_and_tma_launches_are_not_cached(analysis):
    real, cached = analysis
    fake = FakeTensorMode()
    for _ in range(2):
        cached(_foreign_kernel, {"X": fake.from_tensor(torch.empty(4)), "n": 4, "BLOCK": 4}, {})
        cached(triton_attention._attn_fwd, _args(fake), {"Q": ("stable", ([64, 64],))})
    assert len(real.asked) == 4
    assert not kac.is_ours(_foreign_kernel) and kac.is_ours(triton_attention._attn_fwd)


def test_install_wraps_torchs_analysis_once():
    from torch._higher_order_ops import triton_kernel_wrap as twk

    names = [n for n in kac._ANALYSES if hasattr(twk, n)]
    assert names, "this torch has none of the analyses the module knows: update _ANALYSES"
    assert kac.install()
    wrapped = getattr(twk, names[0])
    assert hasattr(wrapped, "flash_inductor_cache")
    assert kac.install() and getattr(twk, names[0]) is wrapped


def test_each_launchs_pruned_autotuner_shares_the_key(analysis):
    """Tracing wraps every launch's pruned configs in a new Autotuner around the same JITFunction:
    one analysis serves them all while their first configs agree."""
    import triton

    real, cached = analysis
    fake = FakeTensorMode()
    kernel = triton_attention._attn_fwd

    def pruned(block_m):
        config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": 64}, num_warps=4, num_stages=3)
        return triton.autotune(configs=[config], key=[])(kernel.fn)

    args = _args(fake)
    args.pop("BLOCK_M")
    cached(pruned(64), dict(args), {})
    cached(pruned(64), dict(args), {})
    assert len(real.asked) == 1
    cached(pruned(128), dict(args), {})
    assert len(real.asked) == 2
