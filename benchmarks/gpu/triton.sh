#!/usr/bin/env bash
# GPU round job for the NHA Triton kernels (issue 3), round 3: one H200,
# 120 s. What rounds 1-2 left unmeasured: the GPU check of the final default
# tiles, the final NHA rows, and the fla peers (compiled with one config per
# kernel: fla's full autotuning took over 110 s at T=4096 in round 2).
# SDPA and Flex rows are reused from round 1 (same card, same shapes).
set -u
export KERAS_BACKEND=torch
out=${JOB_OUT:-/tmp/triton_job}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
  > "$out/gpu.txt" 2>&1
echo "kernels: $(cat kernels/triton/*.py | sha1sum | cut -c1-12)"
# Phase 1 (parallel, <= 45 s): the check, and compiling what phase 2 runs.
timeout 45 python3 tests/triton_gpu_check.py --part kernels --only 1 \
  > "$out/triton_gpu_check.log" 2>&1 &
timeout 45 python3 benchmarks/triton_benchmark.py --warm nha \
  > "$out/warm_nha.log" 2>&1 &
FLA_FIRST_CONFIG=1 timeout 45 python3 benchmarks/triton_benchmark.py \
  --warm fla --lengths 4096 > "$out/warm_fla.log" 2>&1 &
wait
cat "$out/triton_gpu_check.log"; tail -n 3 "$out/warm_nha.log"
tail -n 3 "$out/warm_fla.log"; echo "phase 1 done at ${SECONDS}s"
reuse=()
[ -f benchmarks/results/triton_benchmark_h200_round2.json ] &&
  reuse=(--reuse benchmarks/results/triton_benchmark_h200_round2.json)
FLA_FIRST_CONFIG=1 python3 benchmarks/triton_benchmark.py \
  --lengths 4096,16384,65536 --peers sdpa,flex,fla --no-decode \
  --breakdown 65536 --deadline $((108 - SECONDS)) "${reuse[@]}" \
  --json "$out/triton_benchmark.json" --plot "$out/triton_benchmark.png"
