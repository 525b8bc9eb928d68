#!/usr/bin/env bash
# Session 16, call 2: the eager op's host time A/B in one process, the new GPU tests (OpenAI GPT
# under its run-time checks; mode="reduce-overhead"), then BERT and GPT-2 medium end to end with
# both compiled backends as CUDA graphs.
set -uo pipefail
R=/tmp/r; mkdir -p $R
OUT=$R bash benchmarks/gpu_session.sh >$R/setup.log 2>&1
export PYTHONPATH=/tmp/site FLASH_INDUCTOR_TRITON_AUTOTUNE=0
timeout 60 python3 benchmarks/host_vs_kernel.py --n 2048 --ab-rounds 2 >$R/host_ab.log 2>&1; tail -14 $R/host_ab.log
timeout 150 python3 -m pytest -q -m gpu tests/test_kernels_in_graph.py::test_gpu_openai_gpt_runs_our_kernels_under_its_run_time_checks \
  tests/test_kernels_in_graph.py::test_gpu_reduce_overhead_replays_our_kernels_as_cuda_graphs >$R/gpu_tests_new.log 2>&1; tail -5 $R/gpu_tests_new.log
OUT=$R LANE_CHILD=1 E2E_MODE=reduce-overhead E2E_TAG=_ro E2E_MODELS="bert gpt2-medium" E2E_TIMEOUT=${E2E_TIMEOUT:-330} bash benchmarks/gpu_session.sh e2e_models 2>&1 | tail -8
cd $R && tar czf $OUT/call.tgz *.log *.json 2>/dev/null; ls $R
