"""The CUTLASS build logic on CPU (no GPU, no kernel launch): instance sources, the ninja file,
cache keys, and every way the build can be unavailable, each with a reason and Triton taking over.
One real compile of the entry point and one instance where nvcc and the headers are present."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile

import pytest
import torch

from flash_inductor import cutlass_build as cb
from flash_inductor.backends import cutlass as cutlass_backend

HAVE_HEADERS = True
try:
    cb.cutlass_source_dir()
except cb.BuildError:
    HAVE_HEADERS = False


# ---- real nvcc runs, as many at once as the machine has cores ---------------------------------
# A compile test's units are one job (its sources and nvcc commands, `_COMPILE_JOBS` builds it
# from the test's parameters). The first compile test to run submits the jobs of every compile
# test this session collected to a pool as wide as the machine, then waits for its own: one at a
# time on CI's 2 cores they took about half of CI's time (session 24).
_NVCC_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_NVCC_FUTURES: dict[str, concurrent.futures.Future] = {}


def _run_nvcc_job(units: dict[str, str], commands: list[list[str]]):
    """[(return code, stderr)] of `commands` run in a fresh directory holding `units` (stopping at
    the first failure), and the size of unit.o (0 if none)."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="flash_inductor_nvcc_"))
    try:
        for name, text in units.items():
            (work / name).write_text(text)
        results = []
        for cmd in commands:
            res = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
            results.append((res.returncode, res.stderr))
            if res.returncode:
                break
        unit_o = work / "unit.o"
        return results, unit_o.stat().st_size if unit_o.is_file() else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compiled(request):
    """This compile test's job's result, submitting every collected compile test's job first."""
    global _NVCC_POOL
    if _NVCC_POOL is None:
        _NVCC_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
        for item in request.session.items:
            job = _COMPILE_JOBS.get(getattr(item, "originalname", item.name))
            if job is None or any(m.args and m.args[0] for m in item.iter_markers("skipif")):
                continue
            try:
                spec = job(**getattr(item, "callspec", None).params) if hasattr(item, "callspec") else job()
            except cb.BuildError:
                continue
            _NVCC_FUTURES[item.nodeid] = _NVCC_POOL.submit(_run_nvcc_job, *spec)
    node = request.node
    if node.nodeid not in _NVCC_FUTURES:
        job = _COMPILE_JOBS[node.originalname]
        spec = job(**node.callspec.params) if hasattr(node, "callspec") else job()
        _NVCC_FUTURES[node.nodeid] = _NVCC_POOL.submit(_run_nvcc_job, *spec)
    return _NVCC_FUTURES.pop(node.nodeid).result()


def test_instances_cover_every_dtype_head_dim_mask_and_bias_read_once():
    keys = {(i.dtype, i.head_dim, i.mask, i.bias, i.tma_bias) for i in cb.INSTANCES}
    # One bias read per head dim: by TMA where it fits (128), in the softmax elsewhere.
    assert keys == {(d, h, m, b, b and h in cb.TMA_BIAS_HEAD_DIMS)
                    for d in cb.DTYPES for h in cb.HEAD_DIMS for m in cb.MASKS for b in (False, True)}
    assert len(keys) == len(cb.INSTANCES) == 32  # the default build: at most 3 minutes on 16 cores
    assert len({i.stem for i in cb.INSTANCES}) == len(cb.INSTANCES)
    inst = cb.Instance("bf16", 128, "causal", bias=True)
    assert inst.stem == "fwd_bf16_d128_causal_bias"
    assert inst.source().splitlines() == ['#include "fwd_kernel.cuh"',
                                          "FLASH_CUTLASS_INSTANCE(FLASH_CUTLASS_BF16, 128, FLASH_CUTLASS_CAUSAL_TOP_LEFT, 1, false)"]
    tma_inst = cb.Instance("fp16", 128, "none", bias=True, tma_bias=True)
    assert tma_inst.stem == "fwd_fp16_d128_none_bias_tma" and tma_inst.template_args.endswith(", 2, false")
    with pytest.raises(ValueError, match="tma_bias needs bias=True"):
        cb.Instance("fp16", 128, "none", tma_bias=True)
    assert not any(i.dropout for i in cb.INSTANCES)


def test_the_dropout_family_is_the_forward_with_dropout_compiled_in():
    """Its own library, built on the first forward with dropout: the forward's instances, each with
    dropout, so the default build keeps its size and a dropout call never reaches a unit without."""
    assert cb.DROPOUT_INSTANCES == tuple(cb.Instance(i.dtype, i.head_dim, i.mask, i.bias, i.tma_bias, True)
                                         for i in cb.INSTANCES)
    assert cb.FAMILIES["hopper_dropout"].instances == cb.DROPOUT_INSTANCES
    assert cb.HOPPER_DROPOUT.lib_name != cb.HOPPER.lib_name
    inst = cb.Instance("bf16", 128, "causal_br", bias=True, tma_bias=True, dropout=True)
    assert inst.stem == "fwd_bf16_d128_causal_br_bias_tma_dropout"
    assert inst.label == "bf16/128/causal_br/bias_tma/dropout"
    assert inst.source().splitlines()[1] == (
        "FLASH_CUTLASS_INSTANCE(FLASH_CUTLASS_BF16, 128, FLASH_CUTLASS_CAUSAL_BOTTOM_RIGHT, 2, true)")
    src = cb.api_source(cb.DROPOUT_INSTANCES)
    assert "bool bias = p->bias != nullptr, dropout = p->dropout_p > 0.f;" in src
    assert src.count("&& dropout == true)\n    return flash_cutlass::run_fwd<") == len(cb.DROPOUT_INSTANCES)
    assert "dropout == false" not in src
    # Same flags and sources, another family: another cache directory.
    assert cb.cache_key(["-O3"], "r", "v", family=cb.HOPPER_DROPOUT) != cb.cache_key(["-O3"], "r", "v")


def test_api_switches_over_exactly_the_built_instances():
    some = (cb.Instance("fp16", 64, "none"), cb.Instance("bf16", 256, "causal", bias=True))
    src = cb.api_source(some)
    assert src.count("return flash_cutlass::run_fwd<") == 2
    assert "run_fwd<FLASH_CUTLASS_FP16, 64, FLASH_CUTLASS_NO_MASK, 0, false>" in src
    assert ("mask == FLASH_CUTLASS_CAUSAL_TOP_LEFT && bias == true && dropout == false)\n"
            "    return flash_cutlass::run_fwd<FLASH_CUTLASS_BF16, 256, FLASH_CUTLASS_CAUSAL_TOP_LEFT, 1, false>") in src
    assert '"fp16/64/none\\nbf16/256/causal/bias"' in src


def test_api_tries_the_tma_bias_first_where_the_bias_fits_it():
    softmax = cb.Instance("bf16", 128, "none", bias=True)
    tma = cb.Instance("bf16", 128, "none", bias=True, tma_bias=True)
    src = cb.api_source((softmax, tma))
    fwd, read = src.split("flash_cutlass_bias_read")[0], src.split("flash_cutlass_bias_read")[1]
    tma_case = ("bias && flash_cutlass_bias_tma_ok(p) && dropout == false)\n"
                "    return flash_cutlass::run_fwd<FLASH_CUTLASS_BF16, 128, FLASH_CUTLASS_NO_MASK, 2, false>")
    assert fwd.index(tma_case) < fwd.index(
        "bias == true && dropout == false)\n    return flash_cutlass::run_fwd<FLASH_CUTLASS_BF16, 128, FLASH_CUTLASS_NO_MASK, 1, false>")
    assert (read.index("flash_cutlass_bias_tma_ok(p) && dropout == false) return 2;")
            < read.index("bias == true && dropout == false) return 1;"))
    assert '"bf16/128/none/bias\\nbf16/128/none/bias_tma"' in src  # the listing keeps the build order


def test_ninja_file_compiles_each_unit_and_links_one_library():
    text = cb.ninja_file("/cuda/bin/nvcc", ["-O3"], cb.INSTANCES[:2])
    assert "build api.o: cu api.cu" in text
    for inst in cb.INSTANCES[:2]:
        assert f"build {inst.stem}.o: cu {inst.stem}.cu" in text
    assert f"build {cb.LIB_NAME}: link api.o {cb.INSTANCES[0].stem}.o {cb.INSTANCES[1].stem}.o" in text


def test_cache_key_tracks_sources_flags_toolkit_and_headers(tmp_path, monkeypatch):
    flags = ["-O3", "-I/somewhere"]
    key = cb.cache_key(flags, "release 13.0", "4.2.0")
    assert key == cb.cache_key(flags, "release 13.0", "4.2.0")
    assert key == cb.cache_key(["-O3", "-I/elsewhere"], "release 13.0", "4.2.0")  # paths are not content
    assert key != cb.cache_key(["-O2", "-I/somewhere"], "release 13.0", "4.2.0")
    assert key != cb.cache_key(flags, "release 12.8", "4.2.0")
    assert key != cb.cache_key(flags, "release 13.0", "4.3.0")
    assert key != cb.cache_key(flags, "release 13.0", "4.2.0", cb.INSTANCES[:1])
    copy = tmp_path / "csrc"
    shutil.copytree(cb.CSRC, copy)
    monkeypatch.setattr(cb, "CSRC", copy)
    assert cb.cache_key(flags, "release 13.0", "4.2.0") == key
    (copy / "fwd_kernel.cuh").write_text((copy / "fwd_kernel.cuh").read_text() + "\n// edited\n")
    assert cb.cache_key(flags, "release 13.0", "4.2.0") != key


def test_missing_headers_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASH_INDUCTOR_CUTLASS_DIR", str(tmp_path))
    with pytest.raises(cb.BuildError, match="has no include/cute/tensor.hpp"):
        cb.cutlass_source_dir()
    monkeypatch.delenv("FLASH_INDUCTOR_CUTLASS_DIR")
    monkeypatch.setattr(cb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(cb.BuildError, match="pip install nvidia-cutlass"):
        cb.cutlass_source_dir()


def test_missing_nvcc_says_what_to_install(monkeypatch, tmp_path):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "CUDA_HOME", None)
    with pytest.raises(cb.BuildError, match="nvcc .* was not found: install the CUDA toolkit"):
        cb.find_nvcc()


def _fake_nvcc(tmp_path, body: str) -> str:
    script = tmp_path / "nvcc"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _plan(tmp_path, nvcc):
    return cb.Plan(nvcc, cb.find_ninja(), ["-O3"], tmp_path / "cache" / "key", cb.INSTANCES[:2])


def test_a_failed_build_raises_with_the_compiler_output(tmp_path):
    nvcc = _fake_nvcc(tmp_path, 'echo "fwd_kernel.cuh(42): error: no instance of overload" >&2; exit 1\n')
    p = _plan(tmp_path, nvcc)
    with pytest.raises(cb.BuildError, match=r"the CUTLASS build failed[\s\S]*no instance of overload"):
        cb.build(p)
    assert "no instance of overload" in (p.directory / "build.log").read_text()
    assert not p.library.exists()


def test_a_build_runs_once_then_the_cache_serves(tmp_path):
    calls = tmp_path / "calls"
    # Writes its -o target and counts its runs.
    nvcc = _fake_nvcc(tmp_path, f'echo x >> {calls}\nwhile [ "$1" != "-o" ]; do shift; done\ntouch "$2"\n')
    p = _plan(tmp_path, nvcc)
    assert cb.build(p) == p.library and p.library.is_file()
    runs = len(calls.read_text().splitlines())
    assert runs == 1 + 2 + 1  # api, two instances, link
    assert sorted(f.name for f in p.directory.glob("*.cu")) == sorted(["api.cu"] + [f"{i.stem}.cu" for i in p.instances])
    cb.build(p)
    assert len(calls.read_text().splitlines()) == runs


def test_unavailable_library_is_a_refusal_reason_and_warns_once(monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise cb.BuildError("nvcc (the CUDA toolkit's compiler) was not found: install the CUDA toolkit")

    monkeypatch.setattr(cb, "build", fail)
    cutlass_backend._library.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            for _ in range(3):
                reasons = cutlass_backend.CutlassBackend().unavailable_reasons(torch.device("cuda"))
        assert reasons == ["the CUTLASS library is not available (nvcc (the CUDA toolkit's compiler) was not found: "
                           "install the CUDA toolkit)"]
        assert sum("Triton runs instead" in r.getMessage() for r in caplog.records) == 1
        monkeypatch.setenv(cutlass_backend.ENV_VAR, "0")
        cutlass_backend._library.cache_clear()
        assert "turned off (FLASH_INDUCTOR_CUTLASS=0)" in cutlass_backend.CutlassBackend().unavailable_reasons(
            torch.device("cuda"))[0]
    finally:
        cutlass_backend._library.cache_clear()


def test_info_reports_every_library(monkeypatch, tmp_path, capsys):
    """`flash-inductor info` has a line for every library, built or not (an unlisted family once
    raised KeyError there): each backward head dim's, with dropout and without."""
    from flash_inductor.cli import main

    monkeypatch.setenv("FLASH_INDUCTOR_CACHE_DIR", str(tmp_path))
    for family in cb.FAMILIES.values():
        assert isinstance(cb.status(family), str)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for head_dim in cb.BWD_HEAD_DIMS:
        assert f"CUTLASS backward kernels, head dim {head_dim}: " in out
        assert f"CUTLASS dropout backward kernels, head dim {head_dim}: " in out


def test_build_command_reports_a_missing_toolchain(monkeypatch, tmp_path, capsys):
    from flash_inductor.cli import main

    monkeypatch.setenv("FLASH_INDUCTOR_CUTLASS_DIR", str(tmp_path))
    assert main(["build"]) == 1
    assert "flash-inductor build: " in capsys.readouterr().err


# Benchmark variants that no library builds (benchmarks/cutlass_variants.py and
# cutlass_bwd_time.py --variant time them): compiled where FLASH_INDUCTOR_TEST_VARIANTS=1, as
# benchmarks/gpu_session.sh's `compile_variants` phase does on 16 cores. CI's two cores compile
# the units the libraries build (the variants took 12 of its 31 minutes, session 25).
VARIANT_ONLY = pytest.mark.skipif(not os.environ.get("FLASH_INDUCTOR_TEST_VARIANTS"),
                                  reason="a benchmark variant no library builds (FLASH_INDUCTOR_TEST_VARIANTS=1 "
                                         "compiles it)")


@pytest.mark.skipif(not HAVE_HEADERS or shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                    reason="needs nvcc and the nvidia-cutlass headers")
@pytest.mark.parametrize("variant,inst", [
    pytest.param([], cb.Instance("bf16", 128, "causal", bias=True, tma_bias=True), id="default"),
    pytest.param(["-DFLASH_CUTLASS_TMA_BIAS_OVERLAP=1"], cb.Instance("bf16", 128, "causal", bias=True, tma_bias=True),
                 id="overlap", marks=VARIANT_ONLY),
    pytest.param(["-DFLASH_CUTLASS_TMA_BIAS_OVERLAP=1", "-DFLASH_CUTLASS_OVERLAP_NO_BIAS=1"],
                 cb.Instance("bf16", 128, "causal"), id="overlap_no_bias", marks=VARIANT_ONLY),
    pytest.param([], cb.Instance("fp16", 256, "causal_br", bias=True, dropout=True), id="dropout_softmax_bias"),
])
def test_the_entry_point_and_one_instance_compile_for_sm90a(request, variant, inst):
    """A real nvcc run (about a minute on 2 cores each): the generated units and csrc/ are valid
    CUDA C++ against the installed CUTLASS, before any GPU sees them. The default one is the mask
    fusion with the TMA bias mainloop; the "overlap" ones are that mainloop's consumer that no
    default build compiles (benchmarks/cutlass_variants.py times them), with a bias and in its
    no-bias mode; the dropout one wraps example 88's loop with the softmax-read bias."""
    results, unit_size = _compiled(request)
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert unit_size > 10_000


def _fwd_compile_job(variant, inst):
    p = cb.plan(cb.INSTANCES[:0])
    units = {"api.cu": cb.api_source((inst,)), "unit.cu": inst.source()}
    return units, [[p.nvcc, *p.flags, *variant, "-c", f"{u}.cu", "-o", f"{u}.o"]
                   for u in (("api", "unit") if not variant else ("unit",))]


def test_cutlass_refusals_are_sentences_a_user_can_act_on(monkeypatch):
    """The backend's limits, as dispatch and `explain` print them (the device checks stubbed out:
    this is the table of what an H100 would be told)."""
    from flash_inductor.backends.cutlass import CutlassBackend
    from flash_inductor.inputs import validate

    monkeypatch.setattr(CutlassBackend, "device_reasons", lambda self, device: [])
    monkeypatch.setattr(cutlass_backend, "_library", lambda dropout=False, head_dim=128: (object(), None))
    backend = CutlassBackend()

    def reasons(hq=4, hkv=4, nq=256, nk=256, d=128, dtype=torch.bfloat16, **kw):
        q = torch.randn(1, hq, nq, d, dtype=dtype)
        k = torch.randn(1, hkv, nk, d, dtype=dtype)
        return "; ".join(backend.not_supported_reasons(validate(q, k, k, **kw)))

    assert reasons() == "" and reasons(causal=True) == "" and reasons(d=256, nq=136, nk=200) == ""
    assert reasons(causal="bottom_right", nq=256, nk=256) == ""  # the same as top-left
    assert "head_dim=64 with B*H*Nq*Nk = 262144 < 2^28 scores" in reasons(d=64)
    assert "head_dim=96 (CUTLASS instances: 64, 128, 256)" in reasons(d=96)
    assert reasons(hkv=2) == "" and reasons(causal="bottom_right", nq=128) == ""
    per_head = torch.randn(1, 4, 256, 256, dtype=torch.bfloat16)
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", {"bias"})
    assert "bias: built, awaiting its first GPU test run (Triton runs it)" in reasons(bias=per_head)
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", set())
    assert reasons(bias=per_head) == "" and reasons(bias=per_head, causal=True, hkv=2) == ""
    assert "a bool mask: Triton's kernels skip its fully masked tiles" in reasons(bias=per_head > 0)
    assert "a float32 bias with bfloat16 q" in reasons(bias=per_head.float())
    assert "a mask-like bias (one for every head)" in reasons(bias=per_head[:, :1])
    # Head dim 128 loads the bias by TMA: shapes it cannot take go to Triton, in words.
    keys_only = torch.randn(1, 4, 1, 256, dtype=torch.bfloat16)
    assert "a bias broadcast over query rows at head_dim=128" in reasons(bias=keys_only)
    assert reasons(bias=keys_only.float().to(torch.bfloat16), d=256) == ""
    odd_keys = torch.randn(1, 4, 256, 300, dtype=torch.bfloat16)
    assert "a bias with len_k=300 at head_dim=128 (TMA loads bias rows of 16-byte multiples" in reasons(
        bias=odd_keys, nk=300)
    assert reasons(bias=torch.randn(1, 4, 200, 256, dtype=torch.bfloat16), nq=200) == ""
    assert "a bias with grouped KV heads and len_q=200 at head_dim=128" in reasons(
        bias=torch.randn(1, 4, 200, 256, dtype=torch.bfloat16), nq=200, hkv=2)
    assert "scale=-1 (the CUTLASS softmax needs a finite scale > 0)" in reasons(scale=-1.0)
    assert "bottom-right causal with len_q=256 > len_k=128" in reasons(causal="bottom_right", nk=128)
    assert "causal with grouped KV heads needs len_q = len_k, a multiple of 128" in reasons(hkv=2, nq=200, nk=200,
                                                                                           causal=True)
    assert "len_q=36 (the CUTLASS kernels need a multiple of 8)" in reasons(nq=36)
    assert "dtype=float32" in reasons(dtype=torch.float32)
    # Dropout has a library of its own, asked for only once the input is otherwise accepted.
    asked = []
    monkeypatch.setattr(cutlass_backend, "_library",
                        lambda dropout=False, head_dim=128: asked.append(dropout) or (object(), None))
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", {"dropout"})
    assert "dropout: built, awaiting its first GPU test run (Triton runs it)" in reasons(dropout_p=0.1)
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", set())
    assert reasons(dropout_p=0.1, causal=True, bias=per_head) == "" and asked == [True]
    assert "head_dim=64" in reasons(dropout_p=0.1, d=64) and asked == [True]
    monkeypatch.setattr(cutlass_backend, "_library", lambda dropout=False, head_dim=128: (None, "not available (no nvcc)"))
    assert reasons(dropout_p=0.1) == "the CUTLASS dropout library is not available (no nvcc)"
    assert reasons() == "the CUTLASS library is not available (no nvcc)"


@pytest.mark.parametrize("kind", ["head", "full", "t5", "expanded", "keys", "odd_keys", "offset"])
def test_bias_reaches_the_kernel_as_it_reads_it(kind):
    """What `_bias_ready` hands the kernel, read back the way the kernel reads it (element
    offset b·sb + h·sh + q·sq + key, even strides and address): the user's bias, broadcast."""
    from flash_inductor.inputs import validate

    b, h, nq, nk = 2, 3, 16, 24 if kind != "odd_keys" else 25
    q = torch.randn(b, h, nq, 128, dtype=torch.bfloat16)
    k = torch.randn(b, h, nk, 128, dtype=torch.bfloat16)
    bias = {
        "head": lambda: torch.randn(1, h, nq, nk),
        "full": lambda: torch.randn(b, h, nq, nk),
        "t5": lambda: torch.randn(nq, nk, h).permute(2, 0, 1)[None],
        "expanded": lambda: torch.randn(nq, nk).expand(b, h, nq, nk),
        "keys": lambda: torch.randn(b, h, 1, nk),
        "odd_keys": lambda: torch.randn(b, h, nq, nk),
        "offset": lambda: torch.randn(1 + b * h * nq * nk)[1:].view(b, h, nq, nk),  # 2 bytes off
    }[kind]().to(torch.bfloat16)
    inp = validate(q, k, k, bias)
    b4, strides = cutlass_backend._bias_ready(inp)
    assert b4.stride(-1) == 1 and b4.data_ptr() % 4 == 0 and all(s % 2 == 0 for s in strides)
    if kind in ("t5", "odd_keys", "offset"):  # copied: then ready for the TMA bias too (16-byte rows)
        assert b4.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in strides)
    read = torch.as_strided(b4, (b, h, nq, nk), (*strides, 1))
    assert torch.equal(read, bias.expand(b, h, nq, nk))


# ---- the Hopper backward family -----------------------------------------------------------------


def test_backward_instances_cover_every_dtype_head_dim_mask_and_bias_once():
    """A library per head dim (and dropout): a model builds the one its head dim needs, and no
    build passes 3 minutes on 16 cores."""
    assert cb.BWD_HEAD_DIMS == (64, 128, 256)
    for head_dim in cb.BWD_HEAD_DIMS:
        for dropout in (False, True):
            family = cb.bwd_family(head_dim, dropout)
            assert cb.FAMILIES[family.name] is family and family.api is cb.bwd_api_source
            keys = {(i.dtype, i.head_dim, i.mask, i.bias, i.bias_grad, i.dropout) for i in family.instances}
            assert keys == {(d, head_dim, m, b, g, dropout) for d in cb.DTYPES for m in cb.MASKS
                            for b, g in ((False, False), (True, False), (True, True))}
            assert len(keys) == len(family.instances) == 24
    assert cb.bwd_family(128) is cb.HOPPER_BWD and cb.bwd_family(128, True) is cb.HOPPER_BWD_DROPOUT
    families = [cb.bwd_family(h, drop) for h in cb.BWD_HEAD_DIMS for drop in (False, True)]
    assert len({f.lib_name for f in families}) == len({f.name for f in families}) == 6
    assert len({cb.cache_key(["-O3"], "r", "v", family=f) for f in families}) == 6
    assert cb.bwd_family(64).sources == cb.HOPPER_BWD.sources
    assert cb.bwd_family(64, True).sources == cb.HOPPER_BWD_DROPOUT.sources
    inst = cb.BwdInstance("bf16", 128, "causal_folded", bias=True)
    assert inst.stem == "bwd_bf16_d128_causal_folded_bias"
    assert inst.source().splitlines() == [
        '#include "bwd_kernel.cuh"',
        "FLASH_CUTLASS_BWD_INSTANCE(FLASH_CUTLASS_BF16, 128, FLASH_CUTLASS_CAUSAL_FOLDED, 1, false)"]
    grad = cb.BwdInstance("fp16", 128, "none", bias=True, bias_grad=True)
    assert (grad.stem, grad.label, grad.bias_code) == ("bwd_fp16_d128_none_bias_grad", "fp16/128/none/bias_grad", 2)
    src = cb.bwd_api_source((inst, cb.BwdInstance("fp16", 128, "none"), grad))
    assert src.count("return flash_cutlass::run_bwd<") == 3
    # The call's bias code: 0 none, 1 the bias read, 2 with its gradient written.
    assert "int bias = p->bias == nullptr ? 0 : p->dbias == nullptr ? 1 : 2;" in src
    assert ("if (dtype == FLASH_CUTLASS_BF16 && p->head_dim == 128 && mask == FLASH_CUTLASS_CAUSAL_FOLDED && bias == 1 "
            "&& dropout == false)\n"
            "    return flash_cutlass::run_bwd<FLASH_CUTLASS_BF16, 128, FLASH_CUTLASS_CAUSAL_FOLDED, 1, false>(*p, err, err_len);"
            ) in src
    assert ("mask == FLASH_CUTLASS_NO_MASK && bias == 0 && dropout == false)\n"
            "    return flash_cutlass::run_bwd<FLASH_CUTLASS_FP16, 128, FLASH_CUTLASS_NO_MASK, 0, false>") in src
    assert ("mask == FLASH_CUTLASS_NO_MASK && bias == 2 && dropout == false)\n"
            "    return flash_cutlass::run_bwd<FLASH_CUTLASS_FP16, 128, FLASH_CUTLASS_NO_MASK, 2, false>") in src
    assert '"bf16/128/causal_folded/bias\\nfp16/128/none\\nfp16/128/none/bias_grad"' in src


def test_head_dim_256_backward_is_its_own_kernel():
    """Head dim 256's backward (csrc/bwd_d256.cuh): its own function, the same instances as the
    other head dims' (dtype x mask x bias, and a library with dropout); its sources are its own
    header and the Philox draw, not example 88's collective."""
    for dropout, family in ((False, cb.HOPPER_BWD_D256), (True, cb.HOPPER_BWD_DROPOUT_D256)):
        assert cb.bwd_family(256, dropout) is family and cb.FAMILIES[family.name] is family
        assert {"bwd_d256.cuh", "dropout_philox.h"} <= set(family.sources)
        assert "bwd_kernel.cuh" not in family.sources
        src = cb.bwd_api_source(family.instances)
        assert src.count("return flash_cutlass::run_bwd_d256<") == 24 and "return flash_cutlass::run_bwd<" not in src
    assert cb.HOPPER_BWD_D256.lib_name != cb.HOPPER_BWD_DROPOUT_D256.lib_name
    inst = cb.BwdInstance("bf16", 256, "causal_folded", bias=True, bias_grad=True, dropout=True)
    assert inst.source().splitlines() == [
        '#include "bwd_d256.cuh"',
        "FLASH_CUTLASS_BWD_D256_INSTANCE(FLASH_CUTLASS_BF16, FLASH_CUTLASS_CAUSAL_FOLDED, 2, true)"]
    assert ("if (dtype == FLASH_CUTLASS_BF16 && p->head_dim == 256 && mask == FLASH_CUTLASS_CAUSAL_FOLDED && bias == 2 "
            "&& dropout == true)\n    return flash_cutlass::run_bwd_d256<FLASH_CUTLASS_BF16, FLASH_CUTLASS_CAUSAL_FOLDED, "
            "2, true>(*p, err, err_len);") in cb.bwd_api_source((inst,))
    with pytest.raises(ValueError, match="no backward at head dim 96"):
        cb.BwdInstance("bf16", 96, "none")
    with pytest.raises(ValueError, match="no CUTLASS backward library for head_dim=96"):
        cb.bwd_family(96, dropout=True)


def _header_fields(struct_name: str, header: str) -> list[str]:
    """The field names of a `typedef struct {...} NAME;` in csrc/<header>, in order."""
    import re

    text = (cb.CSRC / header).read_text()
    body = re.search(r"typedef struct \{((?:(?!typedef struct).)*?)\} " + struct_name + ";", text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = []
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        declarators = decl.split(",")
        # the first declarator carries the type: its name is the last word
        names += [re.search(r"(\w+)\s*(\[\d+\])?$", d.strip()).group(1) for d in declarators]
    return names


@pytest.mark.parametrize("mirror,struct_name,header", [("_Params", "FlashCutlassFwdParams", "flash_cutlass.h"),
                                                       ("_BwdParams", "FlashCutlassBwdParams", "flash_cutlass_bwd.h")])
def test_the_ctypes_params_mirror_the_header_field_for_field(mirror, struct_name, header):
    """The library's ABI is these structs: a field added on one side only shifts every field after
    it (session 21's backward fields once landed in the forward's mirror too)."""
    fields = [name for name, _ in getattr(cutlass_backend, mirror)._fields_]
    assert fields == _header_fields(struct_name, header)


def test_the_backward_is_a_library_of_its_own():
    flags = ["-O3"]
    families = (cb.HOPPER, cb.HOPPER_BWD, cb.HOPPER_BWD_DROPOUT)
    assert len({cb.cache_key(flags, "r", "v", family=f) for f in families}) == 3
    assert cb.HOPPER_BWD.lib_name == cb.BWD_LIB_NAME != cb.HOPPER.lib_name
    assert cb.HOPPER_BWD.gencode == cb.HOPPER.gencode
    for name in cb.HOPPER_BWD.sources:
        assert (cb.CSRC / name).is_file(), name
    # The backward's ABI has a header of its own: a change to it does not rebuild the forward.
    assert "flash_cutlass_bwd.h" in cb.HOPPER_BWD.sources and "flash_cutlass_bwd.h" not in cb.HOPPER.sources
    assert "FlashCutlassBwdParams" not in (cb.CSRC / "flash_cutlass.h").read_text()


def test_the_dropout_backward_is_the_backward_with_dropout_compiled_in():
    """Its own library, built on the first backward with dropout (each build stays under 3
    minutes on 16 cores); a call reaches a dropout instance exactly when dropout_p > 0."""
    assert cb.BWD_DROPOUT_INSTANCES == tuple(
        cb.BwdInstance(i.dtype, i.head_dim, i.mask, i.bias, i.bias_grad, True) for i in cb.BWD_INSTANCES)
    assert cb.FAMILIES["hopper_bwd_dropout"].instances == cb.BWD_DROPOUT_INSTANCES
    assert cb.HOPPER_BWD_DROPOUT.lib_name == cb.BWD_DROPOUT_LIB_NAME not in (cb.HOPPER_BWD.lib_name,
                                                                             cb.HOPPER_DROPOUT.lib_name)
    inst = cb.BwdInstance("bf16", 128, "causal", bias=True, bias_grad=True, dropout=True)
    assert (inst.stem, inst.label) == ("bwd_bf16_d128_causal_bias_grad_dropout", "bf16/128/causal/bias_grad/dropout")
    assert inst.source().splitlines()[1] == (
        "FLASH_CUTLASS_BWD_INSTANCE(FLASH_CUTLASS_BF16, 128, FLASH_CUTLASS_CAUSAL_TOP_LEFT, 2, true)")
    src = cb.bwd_api_source(cb.BWD_DROPOUT_INSTANCES)
    assert "bool dropout = p->dropout_p > 0.f;" in src
    assert src.count("&& dropout == true)\n    return flash_cutlass::run_bwd<") == len(cb.BWD_DROPOUT_INSTANCES)
    assert "dropout == false" not in src


@pytest.mark.skipif(not HAVE_HEADERS, reason="needs the nvidia-cutlass headers")
def test_build_command_builds_forward_and_backward_by_default(capsys):
    from flash_inductor.cli import main

    try:
        cb.find_nvcc()
    except cb.BuildError:
        pytest.skip("needs nvcc")
    assert main(["build", "--print-plan"]) == 0
    families = [line for line in capsys.readouterr().out.splitlines() if line.startswith("family: ")]
    assert families == ["family: hopper", "family: hopper_bwd"]  # dropout's libraries: on first use


@pytest.mark.skipif(not HAVE_HEADERS or shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                    reason="needs nvcc and the nvidia-cutlass headers")
@pytest.mark.parametrize("variant,bias,dropout", [
    pytest.param([], False, False, id="default"),
    pytest.param(["-DFLASH_CUTLASS_BWD_DQ_FIRST=1"], False, False, id="dq_first", marks=VARIANT_ONLY),
    pytest.param(["-DFLASH_CUTLASS_BWD_DQ_SPLIT=1"], False, False, id="dq_split", marks=VARIANT_ONLY),
    pytest.param([], True, True, id="bias_dropout"),
    pytest.param([], "grad", False, id="bias_grad"),
    pytest.param(["-DFLASH_CUTLASS_BWD_BIAS_LDSM=1"], "grad", False, id="bias_ldsm", marks=VARIANT_ONLY),
    pytest.param([], False, True, id="dropout"),
])
def test_the_backward_entry_point_and_one_instance_compile_for_sm90a(request, variant, bias, dropout):
    """A real nvcc run (about a minute on 2 cores each): example 88's backward collective with
    our consumer and a diagonal mask (bottom-right), in bf16, which the example's own consumer
    cannot compile; the two dQ schedules no default build compiles (benchmarks/
    cutlass_bwd_time.py --variant times them), which must fit shared memory (a static_assert);
    and the instances that read the bias (through shared memory) and also write its gradient
    (through the same buffer, zeros where the mask skips a tile), also by ldmatrix / stmatrix
    (FLASH_CUTLASS_BWD_BIAS_LDSM, off by default); and dropout's kernel (the keep bits drawn by
    the load warpgroup's spare warps), with the bias (one keep stage beside the bias tiles: the
    shared-memory static_assert). Bias instances may spill (session 22, ptxas, bf16 without a
    mask: 60 bytes reading the bias, 20 also writing its gradient, as many as the no-bias
    instance), and so may dropout's (its register split differs from the example's), so only
    their compile is asserted."""
    results, unit_size = _compiled(request)
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
        assert "C7519" not in stderr, stderr[-3000:]
        if dropout:  # the dV wgmmas serialised: an accumulator written outside them (session 24)
            assert "C7515" not in stderr, stderr[-3000:]
        if not (bias or dropout):
            assert "spill" not in stderr, stderr[-3000:]
    assert unit_size > 10_000


def _bwd_compile_job(variant, bias=False, dropout=False, head_dim=128):
    p = cb.plan((), family=cb.bwd_family(head_dim))
    inst = cb.BwdInstance("bf16", head_dim, "causal_br", bias=bool(bias), bias_grad=bias == "grad", dropout=dropout)
    units = {"api.cu": cb.bwd_api_source((inst,)), "unit.cu": inst.source()}
    # The entry point once per kernel: with the default instance, and with head dim 256's.
    api = not (variant or bias or dropout) or head_dim == 256 and not variant
    return units, [[p.nvcc, *p.flags, *variant, "-Xptxas=-warn-spills", "-c", f"{u}.cu", "-o", f"{u}.o"]
                   for u in (("api", "unit") if api else ("unit",))]


def test_the_cutlass_backward_says_when_triton_runs_it(monkeypatch):
    from flash_inductor.backends.cutlass import CutlassBackend
    from flash_inductor.inputs import validate

    monkeypatch.setattr(cutlass_backend, "_bwd_library", lambda dropout=False, head_dim=128: (object(), None))
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", set())
    backend = CutlassBackend()

    def inp(d=128, hq=4, hkv=4, nq=256, **kw):
        q = torch.randn(1, hq, nq, d, dtype=torch.bfloat16)
        k = torch.randn(1, hkv, 256, d, dtype=torch.bfloat16)
        return validate(q, k, k, **kw)

    for ok in (inp(), inp(causal=True), inp(hkv=2, causal=True), inp(causal="bottom_right", nq=136)):
        assert backend.backward_reasons(ok) == [] and backend.backward_kernel(ok) == "cutlass"
    bias = torch.randn(1, 4, 256, 256, dtype=torch.bfloat16)
    # Head dim 256: its own kernel, taking the same inputs.
    for ok in (inp(d=256), inp(d=256, causal=True), inp(d=256, hkv=2, causal=True), inp(d=256, bias=bias),
               inp(d=256, bias=bias.clone().requires_grad_(), causal=True), inp(d=256, dropout_p=0.1),
               inp(d=256, hkv=2, bias=bias, dropout_p=0.1)):
        assert backend.backward_reasons(ok) == [] and backend.backward_kernel(ok) == "cutlass"
    assert backend.backward_reasons(inp(d=96)) == ["head_dim=96: the CUTLASS backward is built for 64, 128, 256"]
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", {"head dim 256 backward"})
    assert backend.backward_reasons(inp(d=256)) == [
        "head_dim=256: the CUTLASS backward's kernel (csrc/bwd_d256.cuh) is built, awaiting its first GPU test run"]
    assert backend.backward_reasons(inp()) == []
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", set())
    learned = bias.clone().requires_grad_()
    # Measured faster than Triton's since session 22: the bias and its gradient run on CUTLASS.
    assert backend.backward_kernel(inp(bias=bias)) == "cutlass"  # the forward's bias, no gradient
    assert backend.backward_kernel(inp(bias=learned)) == "cutlass"  # and with its gradient
    # A feature measured slower than Triton is refused with its figures, in words.
    slower = "the Triton backward is faster with a bias (figures)"
    monkeypatch.setattr(cutlass_backend, "SLOWER_THAN_TRITON", {"bias backward": slower})
    for b in (bias, learned):
        assert backend.backward_reasons(inp(bias=b)) == [slower] and backend.backward_kernel(inp(bias=b)) == "triton"
    assert backend.backward_kernel(inp()) == "cutlass"
    # Dropout: its own library, validated by the GPU tests like any feature.
    assert backend.backward_kernel(inp(dropout_p=0.1)) == "cutlass"
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", {"dropout backward"})
    assert backend.backward_reasons(inp(dropout_p=0.1)) == [
        "dropout: built into the CUTLASS backward, awaiting its first GPU test run"]
    assert backend.backward_kernel(inp()) == "cutlass"
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", set())
    # A rate whose 16-bit threshold rounds to 2^16 (every score dropped) is Triton's.
    assert backend.backward_reasons(inp(dropout_p=1 - 2**-18)) == [
        f"dropout_p={1 - 2**-18}: the CUTLASS backward takes p < 1 - 2^-17 (its draw compares 16-bit halves "
        "against a threshold below 2^16)"]
    # The rewrite's report names the backward's kernels where they are not the forward's.
    from flash_inductor import dispatch

    assert dispatch.backward_note(inp(d=256, dropout_p=1 - 2**-18), "cutlass") == (
        f"backward by triton (dropout_p={1 - 2**-18}: the CUTLASS backward takes p < 1 - 2^-17 (its draw compares "
        "16-bit halves against a threshold below 2^16))")
    assert dispatch.backward_note(inp(), "cutlass") == dispatch.backward_note(inp(), "triton") == ""
    monkeypatch.setattr(cutlass_backend, "_bwd_library",
                        lambda dropout=False, head_dim=128: (None, "not built: nvcc is missing"))
    assert backend.backward_reasons(inp()) == ["the CUTLASS backward library is not built: nvcc is missing"]
    assert backend.backward_reasons(inp(dropout_p=0.1)) == [
        "the CUTLASS dropout backward library is not built: nvcc is missing"]
    assert backend.backward_reasons(inp(), check_library=False) == []  # the report builds nothing
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", {"backward", "bias backward"})
    assert backend.backward_reasons(inp(d=256))[0] == "the CUTLASS backward: built, awaiting its first GPU test run"
    assert "bias: built into the CUTLASS backward, awaiting its first GPU test run" in backend.backward_reasons(
        inp(bias=bias))


def test_head_dim_64_runs_on_cutlass_where_its_kernels_are_long_enough(monkeypatch):
    """Head dim 64 has libraries of its own (forward and backward, with and without dropout), built
    only for an input of that head dim; below D64_MIN_SCORES scores Triton keeps it (its kernels
    run in Inductor's graph); grouped KV heads with causal need the block's 192 rows (128 with a
    bias or dropout) to divide len_q; a feature awaiting its GPU tests is refused in words."""
    from flash_inductor.backends.cutlass import CutlassBackend
    from flash_inductor.inputs import validate

    monkeypatch.setattr(CutlassBackend, "device_reasons", lambda self, device: [])
    built = []
    monkeypatch.setattr(cutlass_backend, "_library",
                        lambda dropout=False, head_dim=128: built.append((head_dim, dropout)) or (object(), None))
    monkeypatch.setattr(cutlass_backend, "_bwd_library", lambda dropout=False, head_dim=128: (object(), None))
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", set())
    backend = CutlassBackend()

    def inp(b=1, hq=8, hkv=8, n=8192, d=64, **kw):
        q = torch.empty(b, hq, n, d, dtype=torch.bfloat16)
        k = torch.empty(b, hkv, n, d, dtype=torch.bfloat16)
        return validate(q, k, k, **kw)

    assert backend.not_supported_reasons(inp()) == [] and built == [(64, False)]
    assert backend.not_supported_reasons(inp(dropout_p=0.1)) == [] and built[-1] == (64, True)
    assert backend.backward_reasons(inp()) == [] and backend.backward_kernel(inp(causal=True)) == "cutlass"
    assert cb.fwd_family(64) is cb.HOPPER_D64 and cb.fwd_family(64, True) is cb.HOPPER_DROPOUT_D64
    assert cb.fwd_family(128) is cb.fwd_family(256) is cb.HOPPER
    # 8 x 4096^2 = 2^27 scores: Triton's, in words; the library is not built for it.
    built.clear()
    why = backend.not_supported_reasons(inp(n=4096))
    assert why == ["head_dim=64 with B*H*Nq*Nk = 134217728 < 2^28 scores: Triton's kernels, launched from "
                   "Inductor's graph under torch.compile, cost less host time than the opaque CUTLASS op where the "
                   "kernels are this short"] and not built
    assert backend.not_supported_reasons(inp(b=2, n=4096)) == []  # 2^28
    assert backend.not_supported_reasons(inp(d=128, n=256)) == []  # head dim 128 has no such floor
    # Folded causal: blocks of 192 rows (128 with a bias) inside one query head.
    assert backend.not_supported_reasons(inp(hkv=2, n=8064, causal=True)) == []  # 42 x 192
    # whose backward is Triton's: the CUTLASS backward's key blocks are 128 (63 x 128 = 8064 does
    # divide; 8256 = 43 x 192 does not)
    assert backend.backward_reasons(inp(hkv=2, n=8064, causal=True)) == []
    assert backend.not_supported_reasons(inp(hkv=2, n=8256, causal=True)) == []
    assert backend.backward_reasons(inp(hkv=2, n=8256, causal=True)) == [
        "causal with grouped KV heads and len_k=8256 (the CUTLASS backward needs a multiple of 128, its key "
        "block, as the folded mask needs)"]
    assert backend.not_supported_reasons(inp(hkv=2, n=8192, causal=True)) == [
        "causal with grouped KV heads needs len_q = len_k, a multiple of 192 (got 8192 and 8192)"]
    bias = torch.empty(1, 8, 8192, 8192, dtype=torch.bfloat16)
    assert backend.not_supported_reasons(inp(hkv=2, causal=True, bias=bias)) == []
    assert backend.not_supported_reasons(inp(hkv=2, causal=True, dropout_p=0.1)) == []
    assert cutlass_backend.block_rows(64, False, False) == 192
    assert cutlass_backend.block_rows(64, True, False) == cutlass_backend.block_rows(64, False, True) == 128
    assert cutlass_backend.block_rows(128, False, False) == cutlass_backend.block_rows(256, False, False) == 128
    monkeypatch.setattr(cutlass_backend, "UNVALIDATED", {"head dim 64"})
    assert backend.not_supported_reasons(inp()) == [
        "head dim 64: built, awaiting its first GPU test run (Triton runs it)"]
    assert backend.not_supported_reasons(inp(d=128)) == []


# ---- the Ampere-class (sm_80) family -------------------------------------------------------------


def _have_curand() -> bool:
    try:
        cb.curand_include_dir(cb.find_nvcc())
        return True
    except cb.BuildError:
        return False


def test_ampere_instances_cover_each_pass_dtype_bucket_and_dropout_once():
    fwd = {(i.dtype, i.head_dim) for i in cb.AMPERE_INSTANCES if i.kind == "fwd"}
    bwd = {(i.dtype, i.head_dim, i.dropout) for i in cb.AMPERE_INSTANCES if i.kind == "bwd"}
    assert fwd == set(__import__("itertools").product(cb.DTYPES, cb.AMPERE_HEAD_DIMS))
    assert bwd == {(d, h, x) for d in cb.DTYPES for h in cb.AMPERE_HEAD_DIMS for x in (False, True)}
    assert len({i.stem for i in cb.AMPERE_INSTANCES}) == len(cb.AMPERE_INSTANCES) == 18
    inst = cb.AmpereInstance("bwd", "fp16", 128, dropout=True)
    assert inst.stem == "sm80_bwd_fp16_d128_dropout"
    assert inst.source().splitlines() == ['#include "sm80_bwd.cuh"',
                                          "FLASH_CUTLASS_SM80_BWD(FLASH_CUTLASS_FP16, 128, true)"]


def test_ampere_api_picks_the_smallest_bucket_and_the_dropout_instance():
    some = (cb.AmpereInstance("fwd", "bf16", 64), cb.AmpereInstance("bwd", "bf16", 256, dropout=True))
    src = cb.ampere_api_source(some)
    assert "return d <= 64 ? 64 : d <= 256 ? 256 : -1;" in src
    assert "return flash_cutlass_sm80::run_fwd<FLASH_CUTLASS_BF16, 64>(*p, err, err_len);" in src
    assert ("if (dtype == FLASH_CUTLASS_BF16 && bucket == 256 && dropout == true)\n"
            "    return flash_cutlass_sm80::run_bwd<FLASH_CUTLASS_BF16, 256, true>(*p, err, err_len);") in src
    assert src.count("return flash_cutlass_sm80::bwd_workspace<") == 1
    assert '"fwd/bf16/64\\nbwd/bf16/256/dropout"' in src


def test_families_have_their_own_library_key_and_targets():
    flags = ["-O3"]
    assert cb.cache_key(flags, "r", "v") != cb.cache_key(flags, "r", "v", family=cb.AMPERE)
    assert cb.AMPERE.lib_name != cb.HOPPER.lib_name
    assert any("compute_80" in g and "sm_90" in g for g in cb.AMPERE.gencode)  # sm_80 code, also for Hopper
    text = cb.ninja_file("/cuda/bin/nvcc", flags, cb.AMPERE_INSTANCES[:1], cb.AMPERE.lib_name)
    assert f"build {cb.AMPERE_LIB_NAME}: link api.o {cb.AMPERE_INSTANCES[0].stem}.o" in text
    for name in cb.AMPERE.sources:  # every file the units include is hashed
        assert (cb.CSRC / name).is_file(), name


def test_missing_curand_headers_say_what_to_install(monkeypatch, tmp_path):
    nvcc = _fake_nvcc(tmp_path, "exit 0\n")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(cb.BuildError, match="curand_kernel.h .* pip install nvidia-curand"):
        cb.curand_include_dir(nvcc)


@pytest.mark.skipif(not HAVE_HEADERS or not _have_curand(), reason="needs nvcc, the nvidia-cutlass and curand headers")
def test_the_ampere_entry_point_and_one_backward_compile(request):
    """A real nvcc run (about 40 s on 2 cores): example 41 builds against our ATen stand-ins."""
    results, unit_size = _compiled(request)
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert unit_size > 10_000


def _ampere_compile_job():
    p = cb.plan(cb.AMPERE_INSTANCES[:0], family=cb.AMPERE)
    inst = cb.AmpereInstance("bwd", "bf16", 64, dropout=True)  # dropout: the code behind HAS_PYTORCH
    flags = [f if "gencode" not in f else "-gencode=arch=compute_80,code=sm_80" for f in p.flags]
    units = {"api.cu": cb.ampere_api_source((inst,)), "unit.cu": inst.source()}
    return units, [[p.nvcc, *flags, "-c", f"{u}.cu", "-o", f"{u}.o"] for u in ("api", "unit")]


@pytest.mark.skipif(not HAVE_HEADERS or shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                    reason="needs nvcc and the nvidia-cutlass headers")
@pytest.mark.parametrize("variant", [
    pytest.param([], id="default"),
    pytest.param(["-DFLASH_CUTLASS_D256_DQ_ATOMICS=1"], id="dq_atomics", marks=VARIANT_ONLY),
])
def test_the_head_dim_256_backward_compiles_for_sm90a(request, variant):
    """A real nvcc run of head dim 256's own backward (csrc/bwd_d256.cuh: CuTe's TMA and wgmma
    atoms, 64 x 64 tiles) with a diagonal mask, its most register-hungry instance (the bias read,
    its gradient written, dropout drawn: 248 registers, session 27): its shared memory fits an
    sm_90 block (a static_assert), and ptxas neither spills nor serialises its wgmma (C7519 /
    C7520: an accumulator touched between them, or wgmma in a branch it cannot prove
    warpgroup-uniform)."""
    results, unit_size = _compiled(request)
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
        for warning in ("spill", "C7519", "C7520"):
            assert warning not in stderr, stderr[-3000:]
    assert unit_size > 10_000


_COMPILE_JOBS = {
    "test_the_entry_point_and_one_instance_compile_for_sm90a": _fwd_compile_job,
    "test_the_backward_entry_point_and_one_instance_compile_for_sm90a": _bwd_compile_job,
    "test_the_head_dim_256_backward_compiles_for_sm90a":
        lambda variant: _bwd_compile_job(variant, bias="grad", dropout=True, head_dim=256),
    "test_the_ampere_entry_point_and_one_backward_compile": _ampere_compile_job,
}


def test_cutlass_sm80_refusals_are_sentences_a_user_can_act_on(monkeypatch):
    from flash_inductor.backends import cutlass_sm80
    from flash_inductor.inputs import validate

    monkeypatch.setattr(cutlass_sm80.CutlassSm80Backend, "device_reasons", lambda self, device: [])
    monkeypatch.setattr(cutlass_sm80.CutlassSm80Backend, "unavailable_reasons", lambda self, device: [])
    monkeypatch.setattr(cutlass_sm80, "UNVALIDATED", set())
    backend = cutlass_sm80.CutlassSm80Backend()

    def reasons(hq=4, hkv=4, nq=100, nk=120, d=64, dtype=torch.bfloat16, **kw):
        q = torch.randn(1, hq, nq, d, dtype=dtype)
        k = torch.randn(1, hkv, nk, d, dtype=dtype)
        return "; ".join(backend.not_supported_reasons(validate(q, k, k, **kw)))

    bias = torch.randn(1, 4, 100, 120, dtype=torch.bfloat16)
    for ok in (reasons(), reasons(d=96, causal=True, hkv=2), reasons(bias=bias, dropout_p=0.1),
               reasons(bias=bias > 0), reasons(causal="bottom_right"), reasons(d=256, nq=7, nk=3)):
        assert ok == ""
    assert "head_dim=36 (supported: 8..256, a multiple of 8)" in reasons(d=36)
    assert "bottom-right causal with len_q=130 > len_k=120" in reasons(causal="bottom_right", nq=130)
    assert "a float32 bias with bfloat16 q" in reasons(bias=bias.float())
    assert "softcap=30 (logit soft-capping is not in this kernel yet)" in reasons(softcap=30.0)
    assert "dtype=float32" in reasons(dtype=torch.float32)
    monkeypatch.setattr(cutlass_sm80, "UNVALIDATED", {"dropout", "deterministic"})
    assert "dropout: built, awaiting its first GPU test run (Triton runs it)" in reasons(dropout_p=0.1)
    assert reasons() == ""
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert "deterministic: built, awaiting its first GPU test run (Triton runs it)" in reasons()


@pytest.mark.parametrize("kind", ["head", "t5", "keys", "bool", "finfo_min", "odd_keys"])
def test_sm80_bias_reaches_the_kernel_as_it_reads_it(kind):
    """`_kernel_bias` read back the way the kernel reads it: the user's bias broadcast, masked
    entries (False, <= -1e30) as -inf, rows padded to 8 elements, 16-byte-aligned strides."""
    from flash_inductor.backends import cutlass_sm80
    from flash_inductor.inputs import validate

    b, h, nq, nk = 2, 3, 16, 24 if kind != "odd_keys" else 27
    q = torch.randn(b, h, nq, 64, dtype=torch.bfloat16)
    k = torch.randn(b, h, nk, 64, dtype=torch.bfloat16)
    bias = {
        "head": lambda: torch.randn(1, h, nq, nk).bfloat16(),
        "t5": lambda: torch.randn(nq, nk, h).permute(2, 0, 1)[None].bfloat16(),
        "keys": lambda: torch.randn(b, h, 1, nk).bfloat16(),
        "bool": lambda: torch.rand(b, 1, nq, nk) > 0.5,
        "finfo_min": lambda: torch.where(torch.rand(b, 1, 1, nk) > 0.5, 0.0, torch.finfo(torch.bfloat16).min).bfloat16(),
        "odd_keys": lambda: torch.randn(b, h, nq, nk).bfloat16(),
    }[kind]()
    buf, strides = cutlass_sm80._kernel_bias(validate(q, k, k, bias))
    assert buf.stride(-1) == 1 and buf.shape[-1] % 8 == 0 and all(s % 8 == 0 for s in strides)
    read = torch.as_strided(buf, (b, h, nq, nk), (*strides, 1))
    want = bias.expand(b, h, nq, nk)
    if bias.dtype == torch.bool:
        want = torch.where(want, 0.0, float("-inf")).bfloat16()
    else:
        want = want.masked_fill(want <= -1e30, float("-inf"))
    assert torch.equal(read, want)


def test_sm80_packed_rows_map_to_their_sequence_and_position():
    from flash_inductor.backends import cutlass_sm80

    cu = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)
    seq, pos = cutlass_sm80._packed_positions(cu, 8)
    assert seq.tolist() == [0, 0, 0, 2, 2, 2, 2, 3] and pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]


def test_sm80_is_built_for_who_asks_not_for_explain(monkeypatch):
    """Dispatch reaches cutlass_sm80 only after Triton: `explain` and `info` list its reasons
    without building it; forcing it builds it (or says why it cannot)."""
    from flash_inductor import dispatch
    from flash_inductor.backends import cutlass_sm80

    built = []

    def build(p=None, *a, **kw):
        built.append(p)
        raise cb.BuildError("nvcc (the CUDA toolkit's compiler) was not found: install the CUDA toolkit")

    monkeypatch.setattr(cb, "build", build)
    monkeypatch.setattr(cb, "plan", lambda *a, **kw: cb.Plan("nvcc", "ninja", [], pathlib.Path("/nonexistent"),
                                                              cb.AMPERE_INSTANCES, cb.AMPERE))
    cutlass_sm80._library.cache_clear()
    cutlass_sm80._built_or_why.cache_clear()
    try:
        backend = cutlass_sm80.CutlassSm80Backend()
        monkeypatch.setattr(dispatch.config, "kernel", None)
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
        assert "not built yet" in backend.unavailable_reasons(torch.device("cuda"))[0] and not built
        monkeypatch.setattr(dispatch.config, "kernel", "cutlass_sm80")
        assert "not available (nvcc" in backend.unavailable_reasons(torch.device("cuda"))[0] and len(built) == 1
    finally:
        cutlass_sm80._library.cache_clear()
        cutlass_sm80._built_or_why.cache_clear()


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (5, 7), (2, 1, 1, 7), (2, 3, 5, 7)])
def test_sm80_bias_gradient_is_summed_back_to_the_bias_shape(shape):
    """The kernels write dS for every (batch, head, query); broadcast dims are summed (in float32)."""
    from flash_inductor.backends import cutlass_sm80
    from flash_inductor.inputs import validate

    q = torch.randn(2, 3, 5, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 3, 7, 16, dtype=torch.bfloat16)
    bias = torch.randn(shape, dtype=torch.bfloat16)
    dfull = torch.randn(2, 3, 5, 7, dtype=torch.bfloat16)
    got = cutlass_sm80._reduce_to_bias(dfull, validate(q, k, k, bias))
    want = dfull.float().sum_to_size(bias.reshape((1,) * (4 - bias.dim()) + tuple(shape)).shape).reshape(shape)
    assert got.shape == bias.shape and got.dtype == bias.dtype
    assert torch.equal(got, want.to(bias.dtype))


def test_sm80_packed_backward_splits_only_uneven_batches():
    from flash_inductor.backends import cutlass_sm80

    assert cutlass_sm80._varlen_splits(1000, 16000, 16) == 0  # even lengths: the occupancy rule
    assert cutlass_sm80._varlen_splits(6892, 57172, 16) == 4  # issue 6's batch: 2 x max/mean
    assert cutlass_sm80._varlen_splits(100, 110, 10) == 2  # at most one split per 64 keys
