#!/usr/bin/env bash
# One GPU session: install, then the phases named on the command line; logs under $OUT.
# Run on the device machine from the repo root:
#   bash benchmarks/gpu_session.sh tests bench8k        (or: bench_more, e2e, all)
# Phases write their results as they go, so a run cut short keeps what it measured.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on the lent machines (device/KINDS.md): a program using it can take
# the host's shared GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Compiled kernels and autotune choices survive between calls on a machine that stays warm.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton} FLASH_INDUCTOR_CACHE_DIR=${FLASH_INDUCTOR_CACHE_DIR:-$PWD/.cache/flash_inductor}
if [ -z "${LANE_CHILD:-}" ]; then  # a lane of gpu_lanes.sh finds everything installed
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { echo "editable install failed"; tail "$OUT/install.log"; export PYTHONPATH=$PWD:${PYTHONPATH:-}; }
  # curand's headers (the sm_80 kernels' dropout), where the machine has neither the toolkit's nor the wheel's
  [ -d .whl/curand_include ] && export FLASH_INDUCTOR_CURAND_INCLUDE=${FLASH_INDUCTOR_CURAND_INCLUDE:-$PWD/.whl/curand_include}
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  nvcc --version | grep release
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
fi
bench() { timeout "$1" python3 -m flash_inductor.cli bench "${@:3}" --json "$OUT/$2.json" 2>&1 | grep -v Warning | tee "$OUT/$2.log"; }
for phase in "$@"; do
  echo "=== $phase $(date +%T)"
  case $phase in
    tests)
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout ${GPU_TESTS_TIMEOUT:-560} python3 -m pytest -q -m gpu tests/test_triton_kernels.py tests/test_kernels_in_graph.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    ingraph)  # the kernels in Inductor's graph (static launches) and the mask-tile tests
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout 280 python3 -m pytest -q -m gpu tests/test_kernels_in_graph.py tests/test_triton_kernels.py -k "graph or mask or ragged" 2>&1 | tee "$OUT/ingraph_tests.log" | tail -8 ;;
    ragged)  # the ragged-padding parity tests on the GPU (HF models, mask tiles, fully masked rows)
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout 200 python3 -m pytest -q -m gpu tests/test_kernels_in_graph.py -k ragged_padding 2>&1 | tee "$OUT/ragged_tests.log" | tail -8 ;;
    multigpu)  # on a kind with 2 GPUs (nvidia-h100-x2 / nvidia-h200-x2): the NCCL variants
      nvidia-smi topo -m
      timeout 220 python3 -m pytest -q -m gpu tests/test_distributed.py tests/test_context_parallel.py 2>&1 | tee "$OUT/multigpu_tests.log" | tail -15
      timeout 170 python3 benchmarks/ring_scaling.py --world 2 --json "$OUT/ring_scaling.json" 2>&1 | grep -v Warning | tee "$OUT/ring_scaling.log" | tail -5
      timeout 190 python3 benchmarks/ddp_step.py --world 2 --json "$OUT/ddp_step.json" 2>&1 | grep -v Warning | tee "$OUT/ddp_step.log" | tail -5 ;;
    ring)  # 2 GPUs: the ring-attention NCCL tests and its scaling figure only
      timeout 150 python3 -m pytest -q -m gpu tests/test_context_parallel.py 2>&1 | tee "$OUT/ring_tests.log" | tail -5
      timeout 170 python3 benchmarks/ring_scaling.py --world 2 --json "$OUT/ring_scaling.json" 2>&1 | grep -v Warning | tee "$OUT/ring_scaling.log" | tail -3 ;;
    cutlass_build)  # the nvidia-cutlass wheel comes in .whl/ (carried); CUTLASS_FAMILIES="hopper ..." picks families
      ( time timeout 400 python3 -m flash_inductor.cli build $(for f in ${CUTLASS_FAMILIES:-}; do echo --family $f; done) ) 2>&1 | tee "$OUT/cutlass_build.log" | tail -5
      cp "$(python3 -m flash_inductor.cli build --print-plan | sed -n 's/^directory: //p')/build.log" "$OUT/cutlass_build_errors.log" 2>/dev/null
      python3 -m flash_inductor.cli info 2>&1 | tail -7 ;;
    cutlass_build_dropout)  # the dropout forward's library (built on the first forward with dropout otherwise)
      ( time timeout ${DROP_BUILD_TIMEOUT:-300} python3 -m flash_inductor.cli build --family hopper_dropout ) 2>&1 | tee "$OUT/cutlass_dropout_build.log" | tail -4
      cp "$(python3 -m flash_inductor.cli build --family hopper_dropout --print-plan | sed -n 's/^directory: //p')/build.log" "$OUT/cutlass_dropout_build_errors.log" 2>/dev/null ;;
    cutlass_build_bwd_dropout)  # the dropout backward's library (built on the first backward with dropout otherwise)
      ( time timeout ${DROP_BUILD_TIMEOUT:-300} python3 -m flash_inductor.cli build --family hopper_bwd_dropout ) 2>&1 | tee "$OUT/cutlass_bwd_dropout_build.log" | tail -4
      cp "$(python3 -m flash_inductor.cli build --family hopper_bwd_dropout --print-plan | sed -n 's/^directory: //p')/build.log" "$OUT/cutlass_bwd_dropout_build_errors.log" 2>/dev/null ;;
    cutlass_bwd_dropout_smoke)  # the dropout backward against float64 with the Philox reference mask (Triton forward: no forward library)
      timeout ${DROP_SMOKE_TIMEOUT:-150} python3 -c "
import sys, torch
sys.path.insert(0, 'tests')
from philox_mask import keep_mask
from test_triton_kernels import _dense64, _rel
from flash_inductor.backends import cutlass
from flash_inductor.backends.triton import TritonBackend
from flash_inductor.inputs import validate
cutlass.UNVALIDATED.clear()
be, tr = cutlass.CutlassBackend(), TritonBackend()
g = torch.Generator(device='cuda').manual_seed(0)
cases = ((2, 3, 3, 256, 256, False, None, 0.1), (1, 2, 2, 200, 264, 'top_left', None, 0.3),
         (2, 3, 3, 136, 392, 'bottom_right', None, 0.1), (2, 8, 2, 200, 136, False, None, 0.5),
         (2, 8, 2, 384, 384, 'top_left', None, 0.1), (1, 4, 4, 256, 256, 'top_left', 'grad', 0.1),
         (2, 3, 3, 200, 264, False, 'read', 0.2), (1, 2, 2, 1024, 1024, False, None, 0.1))
for b, hq, hkv, nq, nk, causal, bias_kind, p in cases:
    q = torch.randn(b, hq, nq, 128, device='cuda', dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(b, hkv, nk, 128, device='cuda', dtype=torch.bfloat16, generator=g) for _ in range(2))
    bias = torch.randn(1, hq, nq, nk, device='cuda', dtype=torch.bfloat16, generator=g) if bias_kind else None
    seed = torch.randint(-2**62, 2**62, (2,), device='cuda', dtype=torch.int64, generator=g)
    inp = validate(q, k, v, bias, causal=causal, dropout_p=p)
    assert be.backward_kernel(inp) == 'cutlass', be.backward_reasons(inp)
    out, lse = tr.forward(inp, seed)  # the same contract and the same mask
    dout = torch.randn_like(out)
    grads = be.backward(inp, seed, out, lse, dout, None, bias_kind == 'grad')
    torch.cuda.synchronize()
    leaves = [t.double().requires_grad_() for t in (q, k, v)] + ([bias.double().requires_grad_()] if bias_kind == 'grad' else [])
    o64, _ = _dense64(*leaves[:3], leaves[3] if bias_kind == 'grad' else bias, causal, inp.scale, drop_keep=keep_mask(seed, b, hq, nq, nk, p), p=p)
    o64.backward(dout.double())
    errs = ' '.join(f'{n} {_rel(a, l.grad):.2e}' for n, a, l in zip(('dq', 'dk', 'dv', 'dbias'), grads, leaves))
    print(f'b={b} hq={hq} hkv={hkv} nq={nq} nk={nk} causal={causal} bias={bias_kind} p={p}: rel err {errs} (out {_rel(out, o64):.1e})', flush=True)
" 2>&1 | grep -v Warning | tee "$OUT/cutlass_bwd_dropout_smoke.log" ;;
    save_libs)  # every built CUTLASS library into $OUT/cache/<key>/, to carry into the next call (.cache/flash_inductor/cutlass/)
      for f in hopper hopper_dropout hopper_bwd hopper_bwd_dropout hopper_d64 hopper_dropout_d64 hopper_bwd_d64 hopper_bwd_dropout_d64 hopper_bwd_d256 hopper_bwd_dropout_d256; do
        dir=$(python3 -m flash_inductor.cli build --family $f --print-plan | sed -n 's/^directory: //p')
        ls "$dir"/*.so >/dev/null 2>&1 && mkdir -p "$OUT/cache/$(basename "$dir")" && cp "$dir"/*.so "$OUT/cache/$(basename "$dir")/" && echo "saved $f $(basename "$dir")"
      done ;;
    cutlass_bwd_dropout)  # the dropout rows with the CUTLASS forward and backward, peers in the same run (UNVALIDATED let through)
      unvalidated_bench() { timeout "$1" python3 -c "import sys; from flash_inductor.backends import cutlass; cutlass.UNVALIDATED.clear(); from flash_inductor.cli import main; sys.exit(main(sys.argv[1:]))" bench "${@:3}" --json "$OUT/$2.json" 2>&1 | grep -v Warning | tee "$OUT/$2.log"; }
      unvalidated_bench ${DROP_BENCH_TIMEOUT:-300} bench_cutlass_bwd_dropout_8k --lengths ${DROP_LENGTHS:-8192} \
        --cases ${DROP_CASES:-dropout causal+dropout bias+dropout bias+causal+dropout} --peers ${DROP_PEERS:-cutlass triton sdpa_cudnn} ;;
    cutlass_d64)  # head dim 64's CUTLASS forward and backward, every part below
      LANE_CHILD=1 bash "$0" cutlass_d64_build cutlass_d64_tests cutlass_d64_bwd cutlass_d64_bench cutlass_d64_compiled ;;
    cutlass_d64_build)  # its four libraries (each built on the first forward / backward at head dim 64 otherwise;
      # D64_FAMILIES: some)
      ( time timeout ${D64_BUILD_TIMEOUT:-400} python3 -m flash_inductor.cli build $(for f in ${D64_FAMILIES:-hopper_d64 hopper_dropout_d64 hopper_bwd_d64 hopper_bwd_dropout_d64}; do echo --family $f; done) ) 2>&1 | tee "$OUT/cutlass_d64_build.log" | tail -6 ;;
    cutlass_d64_tests)  # its GPU tests (D64_TESTS_K: pytest -k)
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout ${D64_TESTS_TIMEOUT:-240} python3 -m pytest -q -m gpu tests/test_cutlass.py -k "${D64_TESTS_K:-64}" 2>&1 | tee "$OUT/cutlass_d64_tests.log" | tail -12 ;;
    cutlass_d64_bwd)  # the backward alone beside Triton's and cuDNN's (D64_DROPOUT: rates, 0 without)
      for p in ${D64_DROPOUT:-0 0.1}; do
        timeout ${D64_BWD_TIMEOUT:-200} python3 benchmarks/cutlass_bwd_time.py --head-dim 64 --dropout $p --lengths ${D64_LENGTHS:-2048 4096 8192} --json "$OUT/cutlass_bwd_time_d64_p$p.json" 2>&1 | grep -v Warning | tee "$OUT/cutlass_bwd_time_d64_p$p.log"
      done ;;
    cutlass_d64_bench)  # the op's rows at N=8192, dispatch choosing each pass ("flash") beside the peers
      bench ${D64_BENCH_TIMEOUT:-240} bench_d64_8k --head-dim 64 --lengths 8192 --cases ${D64_CASES:-none causal bias dropout} --peers flash triton sdpa_cudnn flex ;;
    cutlass_d64_compiled)  # where the opaque CUTLASS ops pay under torch.compile (Triton's are launched from the graph)
      bench ${D64_BENCH_TIMEOUT:-240} bench_d64_compiled --head-dim 64 --lengths ${D64_COMPILED_LENGTHS:-512 1024 2048 4096} --cases ${D64_COMPILED_CASES:-none causal} --peers flash_compiled triton_compiled
      bench ${D64_BENCH_TIMEOUT:-240} bench_d64_compiled_h96 --head-dim 64 --heads 96 --lengths 512 --cases ${D64_H96_CASES:-none causal dropout} --peers flash_compiled triton_compiled ;;
    compile_variants)  # the nvcc compile tests of benchmark variants no library builds (CI skips them)
      FLASH_INDUCTOR_TEST_VARIANTS=1 timeout ${VARIANTS_TIMEOUT:-300} python3 -m pytest -q tests/test_cutlass_build.py -k "compile" 2>&1 | tee "$OUT/compile_variants.log" | tail -6 ;;
    cutlass_d256)  # head dim 256's CUTLASS backward (csrc/bwd_d256.cuh), every part below
      LANE_CHILD=1 bash "$0" cutlass_d256_smoke cutlass_d256_tests cutlass_d256_bwd cutlass_d256_bench cutlass_d256_compiled ;;
    cutlass_d256_smoke)  # one small backward per mask against Triton's, under a minute (prints D256_SMOKE_OK;
      # Triton's autotuning off: on a fresh machine it took the whole 90 s, session 27)
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout ${D256_SMOKE_TIMEOUT:-90} python3 -c "
import torch
from flash_inductor.backends import cutlass
from flash_inductor.backends.triton import TritonBackend
from flash_inductor.inputs import validate
cutlass.UNVALIDATED.clear()
be, tr = cutlass.CutlassBackend(), TritonBackend()
g = torch.Generator(device='cuda').manual_seed(0)
worst = 0.0
for b, hq, hkv, nq, nk, causal in ((1, 2, 2, 256, 256, False), (1, 2, 2, 200, 136, False), (1, 2, 2, 256, 256, 'top_left'),
                                   (1, 2, 2, 136, 392, 'bottom_right'), (1, 4, 2, 256, 256, 'top_left')):
    q = torch.randn(b, hq, nq, 256, device='cuda', dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(b, hkv, nk, 256, device='cuda', dtype=torch.bfloat16, generator=g) for _ in range(2))
    inp = validate(q, k, v, causal=causal)
    assert be.backward_kernel(inp) == 'cutlass', be.backward_reasons(inp)
    out, lse = tr.forward(inp, None)
    dout = torch.randn_like(out)
    got = be.backward(inp, None, out, lse, dout, None, False)
    want = tr.backward(inp, None, out, lse, dout, None, False)
    torch.cuda.synchronize()
    errs = [((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(got[:3], want[:3])]
    worst = max(worst, *errs)
    print(b, hq, hkv, nq, nk, causal, 'rel err vs Triton dq dk dv', ' '.join(f'{e:.2e}' for e in errs), flush=True)
print('D256_SMOKE_OK' if worst < 2e-2 else 'D256_SMOKE_BAD', worst)
" 2>&1 | grep -v Warning | tee "$OUT/cutlass_d256_smoke.log" ;;
    cutlass_d256_tests)  # its GPU tests (D256_TESTS_K: pytest -k)
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout ${D256_TESTS_TIMEOUT:-240} python3 -m pytest -q -m gpu tests/test_cutlass.py -k "${D256_TESTS_K:-256}" 2>&1 | tee "$OUT/cutlass_d256_tests.log" | tail -12 ;;
    cutlass_d256_bwd)  # the backward alone beside Triton's and cuDNN's (D256_VARIANTS: NAME=-DFLAG=1 ...;
      # D256_FEATURES: runs of cutlass_bwd_time.py's feature flags, e.g. "plain --bias-grad --dropout=0.1", one file each)
      for features in ${D256_FEATURES:-plain}; do
        tag=$(echo "$features" | tr -d '-' | tr '=.' '__')
        timeout ${D256_BWD_TIMEOUT:-200} python3 benchmarks/cutlass_bwd_time.py --head-dim 256 --lengths ${D256_LENGTHS:-2048 4096 8192} $([ "$features" = plain ] || echo "$features") $(for v in ${D256_VARIANTS:-}; do echo --variant $v; done) --json "$OUT/cutlass_bwd_time_d256_$tag.json" 2>&1 | grep -v Warning | tee "$OUT/cutlass_bwd_time_d256_$tag.log"
      done ;;
    cutlass_d256_bench)  # the op's rows, dispatch choosing each pass ("flash"); lets the backward through before its tests pass
      # (D256_BENCH_EXTRA: more bench flags, e.g. --bias-grad; D256_BENCH_TAG: a suffix for the files)
      timeout ${D256_BENCH_TIMEOUT:-240} python3 -c "import sys; from flash_inductor.backends import cutlass; cutlass.UNVALIDATED.discard('head dim 256 backward'); from flash_inductor.cli import main; sys.exit(main(sys.argv[1:]))" bench --head-dim 256 --lengths ${D256_BENCH_LENGTHS:-8192} --cases ${D256_CASES:-none causal} --peers flash triton sdpa_cudnn flex ${D256_BENCH_EXTRA:-} --json "$OUT/bench_d256${D256_BENCH_TAG:-}.json" 2>&1 | grep -v Warning | tee "$OUT/bench_d256${D256_BENCH_TAG:-}.log" ;;
    cutlass_d256_compiled)  # compiled training: the opaque CUTLASS backward against Triton's kernels in Inductor's graph
      bench ${D256_BENCH_TIMEOUT:-240} bench_d256_compiled --head-dim 256 --lengths ${D256_COMPILED_LENGTHS:-1024 2048 4096} --cases ${D256_COMPILED_CASES:-none causal} --peers flash_compiled triton_compiled ;;
    cutlass_dropout_tests)  # the dropout GPU tests alone
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout ${DROP_TESTS_TIMEOUT:-200} python3 -m pytest -q -m gpu tests/test_cutlass.py -k dropout 2>&1 | tee "$OUT/cutlass_dropout_tests.log" | tail -12 ;;
    sm80)  # the sm_80 family (example 41's kernels as sm_80 code): build, GPU tests, then the bench rows
      ( time timeout 300 python3 -m flash_inductor.cli build --family ampere ) 2>&1 | tee "$OUT/sm80_build.log" | tail -4
      cp "$(python3 -m flash_inductor.cli build --family ampere --print-plan | sed -n 's/^directory: //p')/build.log" "$OUT/sm80_build_errors.log" 2>/dev/null
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout ${SM80_TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu tests/test_cutlass_sm80.py 2>&1 | tee "$OUT/sm80_tests.log" | tail -25
      # the bench lets the features through before a session removes them from UNVALIDATED
      sm80_bench() { timeout "$1" python3 -c "import sys; from flash_inductor.backends import cutlass_sm80; cutlass_sm80.UNVALIDATED.clear(); from flash_inductor.cli import main; sys.exit(main(sys.argv[1:]))" bench "${@:3}" --json "$OUT/$2.json" 2>&1 | grep -v Warning | tee "$OUT/$2.log"; }
      sm80_bench 240 bench_sm80_8k --lengths 8192 --cases ${SM80_CASES:-none causal bias bias+causal dropout} --peers cutlass_sm80 triton sdpa_efficient sdpa_cudnn
      sm80_bench 150 bench_sm80_d64 --lengths 8192 --head-dim 64 --cases none dropout --peers cutlass_sm80 triton sdpa_efficient ;;
    sm80_padding)  # issue 6's table with the sm_80 varlen kernels forced (dense row: the same kernel)
      FLASH_INDUCTOR_KERNEL=cutlass_sm80 timeout 240 python3 -c "import runpy, sys; from flash_inductor.backends import cutlass_sm80; cutlass_sm80.UNVALIDATED.clear(); sys.argv = ['padding.py', '--parts', '1', '--json', '$OUT/sm80_padding.json']; runpy.run_path('benchmarks/padding.py', run_name='__main__')" 2>&1 | grep -v Warning | tee "$OUT/sm80_padding.log" | tail -20 ;;
    cutlass_smoke)  # one forward per bias read (TMA, softmax) against float64, under a short limit: a pipeline
      # that deadlocks shows here in seconds instead of eating the test phase's limit
      timeout 120 python3 -c "
import torch
from flash_inductor.backends import cutlass
from flash_inductor.inputs import validate
cutlass.UNVALIDATED.clear(); cutlass.SLOWER_THAN_TRITON.clear()
be = cutlass.CutlassBackend()
g = torch.Generator(device='cuda').manual_seed(0)
for d, nk, causal in ((128, 256, False), (256, 200, False), (128, 392, True)):
    q = torch.randn(2, 3, 256, d, device='cuda', dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 3, nk, d, device='cuda', dtype=torch.bfloat16, generator=g) for _ in range(2))
    bias = torch.randn(1, 3, 256, nk, device='cuda', dtype=torch.bfloat16, generator=g)
    inp = validate(q, k, v, bias, causal=causal)
    out, lse = be.forward(inp, None)
    torch.cuda.synchronize()
    s = (q.double() @ k.double().transpose(-1, -2)) / d ** 0.5 + bias.double()
    if causal:
        s = s.masked_fill(torch.ones(256, nk, device='cuda', dtype=torch.bool).triu(1), float('-inf'))
    ref = torch.softmax(s, -1) @ v.double()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f'd={d} nk={nk} causal={causal} read={be.bias_read(inp)} rel err {err:.2e}', flush=True)
" 2>&1 | grep -v Warning | tee "$OUT/cutlass_smoke.log" ;;
    cutlass_bwd_smoke)  # the backward library, then one backward per mask against float64 under a short limit
      ( time timeout 300 python3 -m flash_inductor.cli build --family hopper_bwd ) 2>&1 | tee "$OUT/cutlass_bwd_build.log" | tail -4
      cp "$(python3 -m flash_inductor.cli build --family hopper_bwd --print-plan | sed -n 's/^directory: //p')/build.log" "$OUT/cutlass_bwd_build_errors.log" 2>/dev/null
      timeout 120 python3 -c "
import torch
from flash_inductor.backends import cutlass
from flash_inductor.backends.triton import TritonBackend
from flash_inductor.inputs import validate
cutlass.UNVALIDATED.clear(); cutlass.SLOWER_THAN_TRITON.clear()
be = cutlass.CutlassBackend()
g = torch.Generator(device='cuda').manual_seed(0)
for hq, hkv, nq, nk, causal, with_bias in ((3, 3, 256, 256, False, False), (3, 3, 200, 392, 'top_left', False), (3, 3, 136, 392, 'bottom_right', False), (4, 2, 256, 256, 'top_left', False), (3, 3, 200, 264, 'top_left', True)):
    q = torch.randn(2, hq, nq, 128, device='cuda', dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, hkv, nk, 128, device='cuda', dtype=torch.bfloat16, generator=g) for _ in range(2))
    bias = torch.randn(1, hq, nq, nk, device='cuda', dtype=torch.bfloat16, generator=g) if with_bias else None
    inp = validate(q, k, v, bias, causal=causal)
    assert be.backward_kernel(inp) == 'cutlass', be.backward_reasons(inp)
    out, lse = TritonBackend().forward(inp, None)  # the same contract; no forward library needed
    dout = torch.randn_like(out)
    dq, dk, dv, _ = be.backward(inp, None, out, lse, dout, None, False)
    torch.cuda.synchronize()
    leaves = [t.double().requires_grad_() for t in (q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))]
    s = (leaves[0] @ leaves[1].transpose(-1, -2)) / 128 ** 0.5 + (bias.double() if with_bias else 0)
    if causal:
        s = s.masked_fill(torch.ones(nq, nk, device='cuda', dtype=torch.bool).triu(1 + (nk - nq if causal == 'bottom_right' else 0)), float('-inf'))
    (torch.softmax(s, -1) @ leaves[2]).backward(dout.double())
    want = [leaves[0].grad] + [t.grad.unflatten(1, (hkv, hq // hkv)).sum(2) for t in leaves[1:]]
    errs = ' '.join(f'{n} {((a.double() - w).norm() / w.norm()).item():.2e}' for n, a, w in zip(('dq', 'dk', 'dv'), (dq, dk, dv), want))
    print(f'hq={hq} hkv={hkv} nq={nq} nk={nk} causal={causal} bias={with_bias}: rel err {errs}', flush=True)
" 2>&1 | grep -v Warning | tee "$OUT/cutlass_bwd_smoke.log"
        [ "$(grep -c "rel err" "$OUT/cutlass_bwd_smoke.log")" = 5 ] || exit 1 ;;
    cutlass_bwd_bench)  # the backward alone, CUTLASS beside Triton and cuDNN, from the same out and lse (no forward library)
      # BWD_VARIANT_ARGS: e.g. "--variant dq_split=-DFLASH_CUTLASS_BWD_DQ_SPLIT=1" (built side by side, timed beside)
      timeout ${BWD_BENCH_TIMEOUT:-300} python3 benchmarks/cutlass_bwd_time.py --lengths ${BWD_LENGTHS:-8192} ${BWD_VARIANT_ARGS:-} --json "$OUT/cutlass_bwd_time.json" 2>&1 | grep -v Warning | tee "$OUT/cutlass_bwd_time.log" ;;
    cutlass_bwd_ncu)  # ncu's full set on the CUTLASS backward, one launch per case (BWD_NCU_ARGS: cutlass_bwd_time.py's
      # case flags, e.g. --bias; BWD_NCU_NAME names the report)
      name=${BWD_NCU_NAME:-bwd_ncu}
      timeout ${BWD_NCU_TIMEOUT:-240} ncu --set full -k regex:device_kernel -f -o "$OUT/$name" python3 benchmarks/cutlass_bwd_time.py \
        --once --lengths ${BWD_LENGTHS:-8192} ${BWD_NCU_ARGS:-} 2>&1 | grep -v Warning | tail -8
      ncu -i "$OUT/$name.ncu-rep" --page details > "$OUT/$name.txt" 2>&1
      ncu -i "$OUT/$name.ncu-rep" --page raw --csv > "$OUT/$name.csv" 2>&1
      grep -E "Duration|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Registers Per|Achieved Occ" "$OUT/$name.txt" | head -24 ;;
    cutlass_tests_dropout_first)  # tests/test_cutlass.py, its dropout tests first (each part its own limit)
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout ${DROP_TESTS_TIMEOUT:-180} python3 -m pytest -q -m gpu tests/test_cutlass.py -k dropout 2>&1 | tee "$OUT/cutlass_dropout_tests.log" | tail -8
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout ${CUTLASS_TESTS_TIMEOUT:-280} python3 -m pytest -q -m gpu tests/test_cutlass.py -k "not dropout" 2>&1 | tee "$OUT/cutlass_tests.log" | tail -8 ;;
    cutlass_tests)
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout 300 python3 -m pytest -q -m gpu tests/test_cutlass.py 2>&1 | tee "$OUT/cutlass_tests.log" | tail -8 ;;
    cutlass_bias)  # the bias rows (after cutlass_tests); features still in UNVALIDATED are let through for the bench only
      unvalidated_bench() { timeout "$1" python3 -c "import sys; from flash_inductor.backends import cutlass; cutlass.UNVALIDATED.clear(); from flash_inductor.cli import main; sys.exit(main(sys.argv[1:]))" bench "${@:3}" --json "$OUT/$2.json" 2>&1 | grep -v Warning | tee "$OUT/$2.log"; }
      unvalidated_bench 200 bench_cutlass_bias_8k --lengths 8192 --cases bias bias+causal --peers cutlass triton flex sdpa_cudnn
      unvalidated_bench 150 bench_cutlass_bias_d256 --lengths 8192 --head-dim 256 --cases bias bias+causal --peers cutlass flex ;;
    cutlass_dropout)  # the dropout rows with the CUTLASS forward (its backward is Triton's), peers in the same run
      bench ${DROP_BENCH_TIMEOUT:-300} bench_cutlass_dropout_8k --lengths ${DROP_LENGTHS:-8192} \
        --cases ${DROP_CASES:-none dropout causal+dropout bias+dropout bias+causal+dropout} --peers cutlass triton sdpa_cudnn sdpa_flash ;;
    cutlass_dropout_sweep)  # issue 4's other lengths and head dim 256 for the dropout rows
      bench 150 bench_cutlass_dropout_2k_4k --lengths 2048 4096 --cases dropout causal+dropout --peers cutlass triton sdpa_cudnn
      bench 120 bench_cutlass_dropout_d256 --lengths 8192 --head-dim 256 --cases dropout causal+dropout --peers cutlass triton sdpa_cudnn ;;
    cutlass_bias_sweep)  # issue 4's other lengths for the bias rows, and the no-bias rows the bias kernel is measured against
      bench 170 bench_cutlass_bias_2k_4k --lengths 2048 4096 --cases bias bias+causal --peers cutlass triton flex sdpa_cudnn
      bench 120 bench_cutlass_none_8k --lengths 8192 --cases none causal --peers cutlass sdpa_cudnn ;;
    cutlass_variants)  # compile-time variants of the bias instances, built side by side and timed (CUTLASS_VARIANTS="a b": some)
      timeout ${CUTLASS_VARIANTS_TIMEOUT:-300} python3 benchmarks/cutlass_variants.py ${CUTLASS_VARIANTS:+--variants $CUTLASS_VARIANTS} --json "$OUT/cutlass_variants.json" 2>&1 | grep -v Warning | tee "$OUT/cutlass_variants.log" | tail -12 ;;
    cutlass_compiled)  # both kernels as backend="flash" runs them, where the eager op is host-bound
      ( export FLASH_INDUCTOR_TRITON_AUTOTUNE=0; bench 170 bench_cutlass_compiled --lengths 2048 4096 --cases none causal --peers flash_compiled cutlass_compiled triton_compiled ) ;;
    cutlass_bench)
      bench 200 bench_cutlass_8k --lengths 8192 --cases none causal --peers cutlass triton sdpa_cudnn flex
      bench 200 bench_cutlass_2k_4k --lengths 2048 4096 --cases none causal --peers cutlass triton sdpa_cudnn
      bench 100 bench_cutlass_d64 --lengths 8192 --head-dim 64 --cases none causal --peers cutlass triton sdpa_cudnn
      bench 100 bench_cutlass_d256 --lengths 8192 --head-dim 256 --cases none causal --peers cutlass triton sdpa_cudnn ;;
    varlen_host)  # issue 6's packed forward: kernel time against the op's, beside dense (VARLEN_HOST_ROUNDS processes)
      for r in $(seq ${VARLEN_HOST_ROUNDS:-2}); do
        timeout 150 python3 benchmarks/varlen_host.py --json "$OUT/varlen_host_r$r.json" 2>&1 | grep -v Warning | tee -a "$OUT/varlen_host.log"
      done ;;
    padding1)  # issue 6's table only (part 1 of padding.py)
      timeout 240 python3 benchmarks/padding.py --parts 1 --json "$OUT/padding1.json" 2>&1 | grep -v Warning | tee "$OUT/padding1.log" | tail -40 ;;
    padding_profile)  # (c)'s kernels beside (a)'s and dense's (env PROFILE_ROWS: padding_profile.py's rows)
      timeout 300 python3 benchmarks/padding_profile.py --json "$OUT/padding_profile.json" ${PROFILE_ROWS:+--rows ${PROFILE_ROWS//,/ }} 2>&1 | grep -v Warning | tee "$OUT/padding_profile.log" | tail -80 ;;
    padding2)  # part 2 of padding.py (a LLaMA-style mask); with the CUTLASS wheel carried its causal-flag
      # row first builds the Hopper library (minutes: session 18's call 4 lost part 2 to one shared limit)
      timeout 420 python3 benchmarks/padding.py --parts 2 --json "$OUT/padding2.json" 2>&1 | grep -v Warning | tee "$OUT/padding2.log" | tail -30 ;;
    padding)  # both parts, each with its own limit
      LANE_CHILD=1 bash "$0" padding1 padding2 ;;  # the environment set above is inherited
    bench_bias_check)
      bench 170 bench_8k_bias_check --lengths 8192 --cases none bias bias+causal --peers triton flex ;;
    bench_dropout)  # the dropout rows only (env DROP_PEERS adds peers; autotuning as set outside)
      bench 200 bench_dropout_8k --lengths 8192 --cases none dropout causal+dropout --peers triton ${DROP_PEERS:+${DROP_PEERS//,/ }}
      # at N=2048 the eager op is host-bound (session 8: 20-60 TFLOP/s), so the compiled one
      bench 150 bench_dropout_d64 --lengths 2048 --head-dim 64 --cases none dropout --peers triton_compiled ${DROP_PEERS:+${DROP_PEERS//,/ }} ;;
    fused_dq)  # the one-kernel dropout backward (dQ by atomics) against the two-kernel one, same process
      # order; env FUSED_AUTOTUNE (default 0) and FUSED_PEERS (SDPA backends to time beside them)
      # (FUSED_CASES: the bench cases, default the four below)
      for fused in 0 1; do
        FLASH_INDUCTOR_FUSED_DQ=$fused FLASH_INDUCTOR_TRITON_AUTOTUNE=${FUSED_AUTOTUNE:-0} bench 240 bench_fused_dq_$fused \
          --lengths 8192 --cases ${FUSED_CASES:-none causal dropout causal+dropout} --peers triton $([ $fused = 1 ] && echo ${FUSED_PEERS:-}) | tail -8
      done ;;
    dropout_variants)  # the keep-mask variants of benchmarks/dropout_variants.py, one process each
      dv=${DROPOUT_VARIANTS:-philox10,philox7,bytes16,hash}
      for variant in ${dv//,/ }; do
        timeout 240 python3 benchmarks/dropout_variants.py --variant $variant --json "$OUT/dropout_$variant.json" 2>&1 | grep -v Warning | tee -a "$OUT/dropout_variants.log" | tail -4
      done ;;
    bench8k)
      bench 420 bench_8k --lengths 8192 --cases none causal bias bias+causal dropout bias+causal+dropout \
        --peers triton sdpa_cudnn sdpa_flash flex ;;
    bench8k_bias)
      bench 330 bench_8k_bias --lengths 8192 --cases none bias bias+causal bias+causal+dropout --peers triton flex sdpa_cudnn
      bench 150 bench_8k_bias_grad --lengths 8192 --cases bias bias+causal --bias-grad --peers triton flex ;;
    issue3_8k)  # issue 3's N=8192 target rows, every peer in one process (env ISSUE3_AUTOTUNE, default 0:
      # the defaults are the autotuner's most frequent picks at D=128; tuning every variant takes longer than a call)
      FLASH_INDUCTOR_TRITON_AUTOTUNE=${ISSUE3_AUTOTUNE:-0} bench ${ISSUE3_TIMEOUT:-540} bench_issue3_8k --lengths 8192 \
        --cases ${ISSUE3_CASES:-none causal bias bias+causal dropout causal+dropout bias+causal+dropout} \
        --peers triton sdpa_cudnn sdpa_flash flex --markdown --plot "$OUT/bench_issue3_8k.png" | tail -40 ;;
    bench_final)
      bench 240 bench_8k_bias_final --lengths 8192 --cases bias bias+causal --peers triton flex
      bench 120 bench_8k_bias_grad_final --lengths 8192 --cases bias+causal --bias-grad --peers triton flex
      bench 170 bench_4k --lengths 4096 --cases none bias+causal --peers triton flex ;;
    bench_more)
      bench 200 bench_8k_rest --lengths 8192 --cases causal+dropout bias+dropout --peers triton sdpa_cudnn sdpa_flash sdpa_efficient eager
      bench 150 bench_8k_bias_grad --lengths 8192 --cases bias bias+causal --bias-grad --peers triton flex
      bench 300 bench_2k_4k --lengths 2048 4096 --cases none causal bias bias+causal dropout --peers triton sdpa_cudnn flex ;;
    issue3_rows)
      bench 300 bench_2k_4k --lengths 2048 4096 --cases none causal bias+causal dropout --peers triton_compiled flex sdpa_cudnn
      bench 120 bench_d64 --lengths 8192 --head-dim 64 --cases none causal --peers triton flex
      bench 120 bench_d256 --lengths 8192 --head-dim 256 --cases none causal --peers triton flex ;;
    softcap_bench)  # Gemma 2's soft-capped scores (head dim 256) against FlexAttention's score_mod
      lengths=${SOFTCAP_LENGTHS:-4096,8192}; cases=${SOFTCAP_CASES:-none,causal,softcap,causal+softcap}
      bench ${SOFTCAP_TIMEOUT:-240} bench_softcap --lengths ${lengths//,/ } --head-dim 256 --cases ${cases//,/ } --peers triton flex ;;
    rows_2k_4k)  # issue 3's N=2048/4096 rows as backend="flash" launches the kernels
      bench ${ROWS_TIMEOUT:-240} bench_2k_4k --lengths 2048 4096 --cases none causal bias+causal dropout --peers triton_compiled flex sdpa_cudnn ;;
    headdims)
      bench 150 bench_d64 --lengths 8192 --head-dim 64 --cases none causal --peers triton sdpa_cudnn flex
      bench 150 bench_d256 --lengths 8192 --head-dim 256 --cases none causal --peers triton sdpa_cudnn flex ;;
    sweep)  # every Triton config timed alone on the e2e shapes (env SWEEP_CASES: config_sweep.py's names)
      timeout ${SWEEP_TIMEOUT:-500} python3 benchmarks/config_sweep.py --json "$OUT/sweep.json" ${SWEEP_CASES:+--cases ${SWEEP_CASES//,/ }} 2>&1 | grep -v Warning | tee "$OUT/sweep.log" | tail -30 ;;
    e2e_models)  # env E2E_MODELS (default: issue 5's five), E2E_ISOLATE=1: one process per backend
      # (E2E_TOGETHER=1 with it: the workers compile at once, about one compile per model instead of two)
      # Autotuning off: each compile would otherwise tune every kernel variant (2-3 min per model);
      # the default configs are the ones the autotuner picked most often (triton_attention.py).
      # E2E_MODE: torch.compile's mode= for both compiled backends (reduce-overhead: CUDA graphs);
      # E2E_TAG: a suffix for the result files, for several runs in one call
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 TORCH_LOGS=recompiles timeout ${E2E_TIMEOUT:-560} python3 benchmarks/e2e_models.py --json "$OUT/e2e_models${E2E_TAG:-}.json" ${E2E_MODELS:+--models $E2E_MODELS} ${E2E_ISOLATE:+--isolate} ${E2E_TOGETHER:+--compile-together} ${E2E_MODE:+--compile-mode $E2E_MODE} 2>&1 | grep -v Warning | tee "$OUT/e2e_models${E2E_TAG:-}.log" | tail -12 ;;
    profile_bert)
      for tiles in 1 0; do FLASH_INDUCTOR_MASK_TILES=$tiles timeout 150 python3 benchmarks/profile_model.py --model bert --seq 512 --batch 8 2>&1 | grep -v Warning | tee -a "$OUT/profile_bert.log" | grep -E "forward|opaque" | sort | uniq -c | head; done
      timeout 100 python3 benchmarks/profile_model.py --model bert --seq 512 --batch 8 --backend inductor 2>&1 | grep -v Warning | tee -a "$OUT/profile_bert.log" | grep forward ;;
    profile_t5)
      for be in flash inductor; do FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout 200 python3 benchmarks/profile_model.py --model t5-base --seq 512 --batch 8 --backend $be --rows 30 2>&1 | grep -v Warning | tee -a "$OUT/profile_t5.log" | grep -E "forward|opaque" | sort | uniq -c | head; done ;;
    kernel_counts)  # a training step's kernels and launches, flash beside inductor (env PROFILE_MODEL,
      # PROFILE_SEQ, PROFILE_BATCH; default GPT-2 medium as e2e_models.py runs it): diff the two lists
      for be in flash inductor; do
        FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout ${PROFILE_TIMEOUT:-120} python3 benchmarks/profile_model.py --train \
          --model ${PROFILE_MODEL:-gpt2-medium} --seq ${PROFILE_SEQ:-1024} --batch ${PROFILE_BATCH:-4} --backend $be --rows 40 \
          >"$OUT/kernels_${PROFILE_MODEL:-gpt2-medium}_$be.log" 2>&1
        grep -E " train [0-9.]+ ms" "$OUT/kernels_${PROFILE_MODEL:-gpt2-medium}_$be.log"
      done ;;
    compile_time)  # the first calls from cold caches, one backend a process (env COMPILE_MODEL, COMPILE_SEQ, COMPILE_BATCH)
      # (COMPILE_BACKENDS: flash, flash-nocache (torch's kernel analysis not memoised), inductor)
      for be in ${COMPILE_BACKENDS:-flash inductor}; do
        FLASH_INDUCTOR_KERNEL_ANALYSIS_CACHE=$([ $be = flash-nocache ] && echo 0 || echo 1) timeout ${COMPILE_TIMEOUT:-240} \
          python3 benchmarks/compile_time.py --model ${COMPILE_MODEL:-gpt2-medium} --seq ${COMPILE_SEQ:-1024} \
          --batch ${COMPILE_BATCH:-4} --backend ${be%-nocache} ${COMPILE_CALLERS:+--callers "$COMPILE_CALLERS"} \
          >"$OUT/compile_time_$be.log" 2>&1
        grep -E "first .* call|kernel analyses" "$OUT/compile_time_$be.log"
      done ;;
    flex_device)  # the no-mask and causal rows against FlexAttention, GPU time per kernel (autotuning off)
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 bench 170 flex_device --lengths 4096 8192 --cases none causal --peers triton flex --timing device ;;
    flex_code)  # FlexAttention's generated Triton source (the log) and both projects' compiled kernels
      # (TTGIR, cubin, metadata: $OUT/kernels) for one shape, to be read with cuobjdump off the GPU
      TORCH_LOGS=output_code FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout 150 python3 benchmarks/flex_source.py >"$OUT/flex_output_code.log" 2>&1
      tail -1 "$OUT/flex_output_code.log"; mkdir -p "$OUT/kernels"
      find "$TRITON_CACHE_DIR" \( -name "triton_tem*" -o -name "_attn_*" \) \( -name "*.ttgir" -o -name "*.cubin" -o -name "*.json" \) |
        while read -r f; do cp "$f" "$OUT/kernels/$(basename "$(dirname "$f")" | cut -c1-12)_$(basename "$f")"; done
      ls "$OUT/kernels" | wc -l ;;
    ab_patch)  # A/B of a kernel change: env AB_BENCH (cli bench arguments) timed, then the patch in
      # $AB_PATCH applied, env AB_TESTS (pytest arguments) run and the bench timed again; reverted after
      read -r -a ab_args <<<"${AB_BENCH:---lengths 2048 4096 --cases causal bias+causal --peers triton_compiled}"
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 bench 200 ab_before "${ab_args[@]}" | tail -12
      patch -p1 <"$AB_PATCH" && {
        FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout 240 python3 -m pytest -q -m gpu ${AB_TESTS:-tests/test_triton_kernels.py -k causal} 2>&1 | tee "$OUT/ab_tests.log" | tail -5
        FLASH_INDUCTOR_TRITON_AUTOTUNE=0 bench 200 ab_after "${ab_args[@]}" | tail -12
        patch -R -p1 <"$AB_PATCH"
      } ;;
    ab_variants)  # several patches timed against main in one process each (env AB_PATCHES: patch files;
      # AB_BENCH: cli bench arguments; AB_TESTS: pytest arguments run with each patch applied, if set;
      # AB_ROUNDS: how many times main and the patches are timed in turn, default 1: two rounds show
      # how far one process's figures wander from the next's)
      read -r -a ab_args <<<"${AB_BENCH:---lengths 4096 8192 --cases bias bias+causal --peers triton --timing device}"
      for round in $(seq "${AB_ROUNDS:-1}"); do
        FLASH_INDUCTOR_TRITON_AUTOTUNE=0 bench 200 "ab_main_r$round" "${ab_args[@]}" | grep -E "TFLOP|bwd µs"
        for p in ${AB_PATCHES:?}; do
          name=$(basename "$p" .patch)
          patch -s -p1 <"$p" || { echo "$name does not apply"; continue; }
          [ -n "${AB_TESTS:-}" ] && [ "$round" = 1 ] && FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout 240 python3 -m pytest -q -m gpu $AB_TESTS 2>&1 | tee "$OUT/ab_tests_$name.log" | tail -3
          FLASH_INDUCTOR_TRITON_AUTOTUNE=0 bench 200 "ab_${name}_r$round" "${ab_args[@]}" | grep -E "TFLOP|bwd µs"
          patch -s -R -p1 <"$p"
        done
      done ;;
    gpu_tests)  # env GPU_TESTS: pytest arguments (the marked GPU tests of chosen modules)
      FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout ${GPU_TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu $GPU_TESTS 2>&1 | tee -a "$OUT/gpu_tests_chosen.log" | tail -8 ;;
    autotuned_tests)  # the GPU tests that tune (every candidate timed: what restore_value guards)
      timeout ${GPU_TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu tests/test_triton_kernels.py -k autotuned 2>&1 | tee -a "$OUT/gpu_tests_autotuned.log" | tail -4 ;;
    host_profile)  # cProfile of compiled steps, flash beside inductor (env HOST_MODELS, default bert;
      # HOST_MODES: forward and/or train); the output code goes to the log too
      for m in ${HOST_MODELS:-bert}; do
        for mode in ${HOST_MODES:-forward}; do
          for be in flash inductor; do
            log="$OUT/host_${m}_${mode}_${be}.log"
            FLASH_INDUCTOR_TRITON_AUTOTUNE=0 TORCH_LOGS=output_code timeout 150 python3 benchmarks/profile_model.py --host \
              --model $m --backend $be $([ $mode = train ] && echo --train) >"$log" 2>&1
            grep "per step" "$log"
          done
        done
      done ;;
    e2e)
      timeout 200 python3 -m flash_inductor.cli demo --model bert --seq 512 --batch 8 --compare-inductor 2>&1 | tee "$OUT/demo_bert.log" | tail -8 ;;
  esac
done
echo "=== done $(date +%T)"
