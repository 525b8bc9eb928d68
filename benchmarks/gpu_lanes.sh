#!/usr/bin/env bash
# Several gpu_session.sh jobs at once on a machine of several GPUs, one lane per GPU.
#   bash benchmarks/gpu_lanes.sh "E2E_MODELS=llama-1b e2e_models" "E2E_MODELS=bert e2e_models" tests ...
# Each argument is one job: optional VAR=value words, then gpu_session.sh phases. Job k runs on
# lane k mod (number of GPUs), lanes in parallel, jobs of a lane one after another. Each lane
# has its own GPU and its own share of the cores (taskset), so Inductor's compile workers of one
# lane do not steal host time from a lane that is timing: compiled models are host-bound
# (docs/design.md §17). Host figures from different lanes are still not compared with each
# other, only backends inside one job's process.
# Everything under $OUT is packed into $OUT/lanes.tgz (the device tool returns at most 8 files)
# after LANES_DEADLINE seconds at the latest, so a long job cannot lose the others' results.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The caches every lane's gpu_session.sh uses, set here so the prebuild below fills the same one
# (session 10: it did not, and a lane rebuilt CUTLASS while the others timed host-bound models).
export TRITON_CACHE_DIR=$PWD/.cache/triton FLASH_INDUCTOR_CACHE_DIR=$PWD/.cache/flash_inductor
bash benchmarks/gpu_session.sh >"$OUT/install.log" 2>&1   # installs once; no phases
cat "$OUT/install.log"
export LANE_CHILD=1 PYTHONPATH=${PYTHONPATH:-}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PYTHONPATH
# The CUTLASS kernels build on first use: done here, once, on every core, before any lane times
# anything. Left to the lanes, one lane's 16 nvcc processes ran while the others timed host-bound
# models (session 9: T5's flash forward 22.6 ms against 15.5 for Inductor timed before the build).
if python3 -c "import cutlass_library" 2>/dev/null; then
  ( time timeout 300 python3 -m flash_inductor.cli build ) 2>&1 | tail -4
fi
gpus=$(nvidia-smi -L | wc -l); cores=$(nproc); per=$(( cores / gpus ))
echo "lanes: $gpus GPUs, $per cores each, $# jobs"
for ((lane = 0; lane < gpus; lane++)); do
  (
    k=0
    for job in "$@"; do
      if (( k % gpus == lane )) && [ ! -e "$OUT/.stop" ]; then
        dir="$OUT/job$k"; mkdir -p "$dir"
        echo "=== lane $lane job $k: $job $(date +%T)"
        read -ra words <<<"$job"
        envs=(); phases=()
        for w in "${words[@]}"; do [[ $w == *=* ]] && envs+=("$w") || phases+=("$w"); done
        env "${envs[@]}" OUT="$dir" CUDA_VISIBLE_DEVICES=$lane \
          taskset -c $((lane * per))-$((lane * per + per - 1)) bash benchmarks/gpu_session.sh "${phases[@]}" >"$dir/session.log" 2>&1
        tail -n 14 "$dir/session.log"
      fi
      k=$((k + 1))
    done
  ) >"$OUT/lane$lane.log" 2>&1 &
done
deadline=${LANES_DEADLINE:-530}
lanes=$(jobs -p)
( sleep "$deadline"; echo "deadline ${deadline}s: stopping the lanes"; touch "$OUT/.stop"
  pkill -f gpu_session.sh; pkill -f "python3 .*benchmarks/"; pkill -f "python3 -m (pytest|flash_inductor)" ) >"$OUT/deadline.log" 2>&1 &
killer=$!
wait $lanes
pkill -P $killer; kill $killer 2>/dev/null
cat "$OUT"/lane*.log
tar czf /tmp/lanes.tgz -C "$OUT" . && mv /tmp/lanes.tgz "$OUT/lanes.tgz"
find "$OUT" -mindepth 1 -not -name lanes.tgz -not -name 'lane*.log' -delete 2>/dev/null
echo "=== lanes done $(date +%T)"
