#!/usr/bin/env bash
# GPU round job for the NHA Triton kernels (issue 3): one H200, ~220 s.
# Most important first; every row is saved to JSON as soon as it is measured.
set -u
export KERAS_BACKEND=torch
out=${JOB_OUT:-/tmp/triton_job}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
  > "$out/gpu.txt" 2>&1
echo "kernels: $(cat kernels/triton/*.py | sha1sum | cut -c1-12)"
# Correctness of these kernels on this card first (bf16/fp32, real sizes).
timeout 45 python3 tests/triton_gpu_check.py --part quick \
  2>&1 | tee "$out/triton_gpu_check.log"
reuse=()
[ -f benchmarks/results/triton_benchmark_h200_round1.json ] &&
  reuse=(--reuse benchmarks/results/triton_benchmark_h200_round1.json)
# Switches and tile variants timed per part at T=16384, after SDPA (most
# useful first; whatever time is left).
tune="split=1;split=1,slot_regs=128;KERAS_NHA_TRITON_KEEP_STATES=0;warps=4"
tune="$tune;window_warps=4,query=64,key=32,query_bwd=64,key_bwd=32"
tune="$tune,dkdv_query=32,dkdv_key=32;dkdv_query=32,dkdv_key=128"
tune="$tune;split=1,warps=4;slot_regs=128"
python3 benchmarks/triton_benchmark.py --lengths 4096,16384,65536 \
  --peers sdpa,tune,flex,fla --tune "$tune" --breakdown 65536,4096 \
  --deadline $((200 - SECONDS)) "${reuse[@]}" \
  --json "$out/triton_benchmark.json" --plot "$out/triton_benchmark.png"
