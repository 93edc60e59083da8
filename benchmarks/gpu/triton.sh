#!/usr/bin/env bash
# GPU round job for the NHA Triton kernels (issue 3): one H200, ~220 s.
# Most important first; every row is saved to JSON as soon as it is measured.
set -u
export KERAS_BACKEND=torch
out=${JOB_OUT:-/tmp/triton_job}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
  > "$out/gpu.txt" 2>&1
echo "kernels: $(sha1sum kernels/triton/*.py | sha1sum | cut -c1-12)"
reuse=()
[ -f benchmarks/results/triton_benchmark_h200_round1.json ] &&
  reuse=(--reuse benchmarks/results/triton_benchmark_h200_round1.json)
python3 benchmarks/triton_benchmark.py --lengths 4096,16384,65536 \
  --peers sdpa,flex,fla --breakdown 65536,4096 --deadline 195 "${reuse[@]}" \
  --json "$out/triton_benchmark.json" --plot "$out/triton_benchmark.png"
