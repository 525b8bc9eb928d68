#!/usr/bin/env bash
# Session 16, call 3: T5-base, BLOOM-560m and LLaMA-1B end to end with both compiled backends as
# CUDA graphs (mode="reduce-overhead"); results straight under $OUT (JSON after each model).
set -uo pipefail
bash benchmarks/gpu_session.sh >$OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site
LANE_CHILD=1 E2E_MODE=reduce-overhead E2E_TAG=_ro E2E_MODELS="t5-base bloom-560m llama-1b" E2E_TIMEOUT=${E2E_TIMEOUT:-545} bash benchmarks/gpu_session.sh e2e_models 2>&1 | tail -9
