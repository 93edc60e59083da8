#!/usr/bin/env bash
# GPU round job for the NHA Triton kernels (issue 3): one H200, ~240 s.
# Phase 1 (parallel, <= ~110 s): the GPU correctness checks split over
# processes, and everything the measuring run needs compiled into Triton's
# and Inductor's disk caches (compiling is CPU-bound and serial per process;
# round 1 spent most of its time compiling). Phase 2: measure, alone on the
# GPU, most important first; every row is saved as soon as it is measured.
set -u
export KERAS_BACKEND=torch
out=${JOB_OUT:-/tmp/triton_job}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
  > "$out/gpu.txt" 2>&1
echo "kernels: $(cat kernels/triton/*.py | sha1sum | cut -c1-12)"
# Before/after in one run (the previous defaults first), then variants.
old="split=0,warps=8,window_warps=8,query=128,key=64,query_bwd=64"
old="$old,key_bwd=64,dkdv_query=64,dkdv_key=64"
tune="$old;dkdv_warps=8,dkdv_query=32,dkdv_key=128;warps=8"
tune="$tune;KERAS_NHA_TRITON_KEEP_STATES=0;stages=3;scan=128;slot_regs=128"
lengths=4096,16384,65536

check() {  # indices name
  timeout 110 python3 tests/triton_gpu_check.py --part kernels --only "$1" \
    > "$out/check_$2.log" 2>&1
}
check 0,1,5 a & check 2,4 b & check 3,6 c & check 7,8 d & check 9 e &
timeout 110 python3 benchmarks/triton_benchmark.py --warm nha --tune "$tune" \
  > "$out/warm_nha.log" 2>&1 &
timeout 110 python3 benchmarks/triton_benchmark.py --warm fla \
  --lengths $lengths > "$out/warm_fla.log" 2>&1 &
wait
cat "$out"/check_?.log | tee "$out/triton_gpu_check.log"
tail -3 "$out/warm_nha.log" "$out/warm_fla.log"
echo "phase 1 done at ${SECONDS}s"

reuse=()
[ -f benchmarks/results/triton_benchmark_h200_round1.json ] &&
  reuse=(--reuse benchmarks/results/triton_benchmark_h200_round1.json)
python3 benchmarks/triton_benchmark.py --lengths $lengths \
  --peers sdpa,flex,tune,fla --tune "$tune" --breakdown 65536,4096 \
  --deadline $((222 - SECONDS)) "${reuse[@]}" \
  --json "$out/triton_benchmark.json" --plot "$out/triton_benchmark.png"
