#!/usr/bin/env bash
# One GPU session: install, GPU tests, the demo and the kernel benchmark; logs under $OUT.
# Run on the device machine from the repo root: bash benchmarks/gpu_session.sh [tests|bench|all]
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { echo "editable install failed"; tail "$OUT/install.log"; export PYTHONPATH=$PWD:${PYTHONPATH:-}; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m flash_inductor.cli info
if [ "$what" = tests ] || [ "$what" = all ]; then
  FLASH_INDUCTOR_TRITON_AUTOTUNE=0 timeout 420 python3 -m pytest -q -x -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  timeout 240 python3 -m pytest -q tests/test_rewrite.py $(ls tests/test_hf_models.py 2>/dev/null) -x 2>&1 | tee "$OUT/cpu_tests_on_gpu_machine.log" | tail -5
  timeout 200 python3 -m flash_inductor.cli demo --model bert --seq 512 --batch 8 --compare-inductor 2>&1 | tee "$OUT/demo_bert.log" | tail -6
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 540 python3 benchmarks/bench_attention.py --lengths ${BENCH_LENGTHS:-8192} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v Warning
fi
