#!/usr/bin/env bash
# GPU round job for the NHA Triton kernels (issue 3): one H200, alone on
# its host, <= 210 s. Session 6, round 1: a clean measurement of the one
# open target, T=4096 fwd+bwd eager through the public op vs SDPA causal.
# Phase 1 (<= 75 s, nothing timed): compile NHA (defaults and the short
# tile variants), Flex and fla into the disk caches, side by side.
# Phase 2 (one process, the GPU and the CPU otherwise idle): first the
# T=4096 eager rows (SDPA, the public op with and without state, the
# kernels, CUDA graphs; three timing methods and the CPU split each; a
# Chrome trace of the public op), then the tile variants at 4096, then
# the table at 4096/16384/65536 with the breakdowns and peers.
set -u
export KERAS_BACKEND=torch
out=${JOB_OUT:-/tmp/triton_job}
limit=${JOB_LIMIT_S:-210}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
  > "$out/gpu.txt" 2>&1
nproc > "$out/cpus.txt"; lscpu > "$out/lscpu.txt" 2>&1
echo "kernels: $(cat kernels/triton/*.py | sha1sum | cut -c1-12)"
export FLA_TUNED_CONFIGS=benchmarks/results/triton_fla_configs_h200.json,benchmarks/results/triton_fla_configs_h200_s4r1.json
export FLA_UNTUNED_FALLBACK=1
short="KERAS_NHA_TRITON_OVERLAP=1;dkdv_key=64;dkdv_key=64,dkdv_warps=4;query_bwd=32;query=32;warps=8;short_chunks=0;key=64"

timeout 75 python3 benchmarks/triton_benchmark.py --warm nha \
  --tune "$short" > "$out/warm_nha.log" 2>&1 &
timeout 75 python3 benchmarks/triton_benchmark.py --warm flex \
  > "$out/warm_flex.log" 2>&1 &
timeout 75 python3 benchmarks/triton_benchmark.py --warm fla \
  --lengths 4096 > "$out/warm_fla.log" 2>&1 &
wait
tail -qn 2 "$out"/warm_*.log
echo "phase 1 done at ${SECONDS}s"

NHA_BENCH_GRAPHS=1 python3 benchmarks/triton_benchmark.py \
  --eager 4096 --trace "$out/trace_public_op_4096.json" \
  --tune-short "$short" \
  --lengths 4096,16384,65536 --peers sdpa,flex,fla --no-decode \
  --breakdown 4096,65536 --host-profile 4096 \
  --deadline $((limit - 20 - SECONDS)) \
  --json "$out/triton_benchmark.json" --plot "$out/triton_benchmark.png"
gzip -f "$out/trace_public_op_4096.json" 2>/dev/null
echo "job done at ${SECONDS}s"
