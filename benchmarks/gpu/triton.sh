#!/usr/bin/env bash
# GPU round job for the NHA Triton kernels (issue 3): one H200, <= 230 s.
# Session 4, round 2. Round 1 started 21 processes at once (ten fla tuning
# shards, ten checks, a warm-up): compiling is CPU-bound and none of the
# checks finished in 80 s. Now phase 1 runs eight: the five processes of
# the final check (triton_final.sh: the shipped defaults) and warm-ups of
# NHA, Flex and fla (fla with the configs tuned in earlier rounds, every
# other kernel on its first config: a full fla tuning does not fit a
# round). Phase 2: one measuring process, every row from this run, with
# the cached launcher's rows (checked bit-identical first) and the CPU
# split at T=4096.
set -u
export KERAS_BACKEND=torch
out=${JOB_OUT:-/tmp/triton_job}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
  > "$out/gpu.txt" 2>&1
echo "kernels: $(cat kernels/triton/*.py | sha1sum | cut -c1-12)"
export FLA_TUNED_CONFIGS=benchmarks/results/triton_fla_configs_h200.json,benchmarks/results/triton_fla_configs_h200_s4r1.json
export FLA_UNTUNED_FALLBACK=1
# The chunk scans walked chunk by chunk per thread (scan_walk) at T=65536,
# with 128-1024 state elements per program; measured last.
walk="scan_walk=1"
tune="$walk;$walk,scan=512;$walk,scan=1024;$walk,scan=128"

TRITON_FINAL_S=100 JOB_OUT="$out/check" bash benchmarks/gpu/triton_final.sh \
  > "$out/check.log" 2>&1 &
timeout 100 python3 benchmarks/triton_benchmark.py --warm nha --tune "$tune" \
  > "$out/warm_nha.log" 2>&1 &
timeout 100 python3 benchmarks/triton_benchmark.py --warm flex \
  > "$out/warm_flex.log" 2>&1 &
timeout 100 python3 benchmarks/triton_benchmark.py --warm fla \
  --lengths 4096 > "$out/warm_fla.log" 2>&1 &
wait
cat "$out/check.log"
tail -qn 1 "$out"/warm_*.log
echo "phase 1 done at ${SECONDS}s"

FLA_RECORD_CONFIGS="$out/fla_configs_all.json" NHA_BENCH_GRAPHS=1 \
NHA_BENCH_FAST_LAUNCH=1 python3 benchmarks/triton_benchmark.py \
  --lengths 4096,16384,65536 --peers sdpa,flex,tune,fla --no-decode \
  --tune "$tune" --tune-length 65536 \
  --breakdown 65536,4096 --host-profile 4096 --deadline $((198 - SECONDS)) \
  --json "$out/triton_benchmark.json" --plot "$out/triton_benchmark.png"
echo "measuring done at ${SECONDS}s"
# The walked scans at the short lengths, with what time is left.
KERAS_NHA_TRITON_BLOCKS=$walk timeout $((222 - SECONDS)) python3 \
  benchmarks/triton_benchmark.py --lengths 4096 --peers none --no-decode \
  --breakdown 4096 --json "$out/triton_scan_walk.json"
cat "$out"/check/*.log > "$out/triton_gpu_check.log"
echo "job done at ${SECONDS}s"
