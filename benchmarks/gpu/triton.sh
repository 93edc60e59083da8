#!/usr/bin/env bash
# GPU round job for the NHA Triton kernels (issue 3): one H200, <= 200 s.
# Round 2 of session 3 (final numbers). Phase 1 (parallel, <= 80 s): the GPU
# checks of the changed kernels and new defaults (bf16 chunk states, merged
# launches), compiling what phase 2 measures, and fla's autotuning spread
# over ten processes (each compiles and times every tenth config of each
# kernel). Phase 2: one measuring process, every row from this run; fla's
# kernels are tuned there over the three fastest configs of the shards,
# timed again alone.
set -u
export KERAS_BACKEND=torch
out=${JOB_OUT:-/tmp/triton_job}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
  > "$out/gpu.txt" 2>&1
echo "kernels: $(cat kernels/triton/*.py | sha1sum | cut -c1-12)"
# fla configs tuned in an earlier round on this card (same software).
export FLA_TUNED_CONFIGS=benchmarks/results/triton_fla_configs_h200.json
shards=10

for i in $(seq 0 $((shards - 1))); do
  FLA_TUNE_SHARD=$i/$shards FLA_SHARD_TIMINGS="$out/fla_shard_$i.json" \
    timeout 80 python3 benchmarks/triton_benchmark.py --warm fla \
    --lengths 4096 > "$out/warm_fla_$i.log" 2>&1 &
done
for only in 0 1 2 4 5 7 8; do
  timeout 80 python3 tests/triton_gpu_check.py --part kernels --only $only \
    > "$out/check_$only.log" 2>&1 &
done
# float32 with padding (tf32x3 dots now: round 1's ieee ones compiled to
# scalar code and did not finish in 95 s).
for only in 1 2; do
  timeout 80 python3 tests/triton_gpu_check.py --part issue --only $only \
    > "$out/check_fp32_$only.log" 2>&1 &
done
timeout 80 python3 tests/triton_gpu_check.py --part issue --only 4 \
  > "$out/check_compile.log" 2>&1 &
timeout 80 python3 tests/triton_gpu_check.py --part issue --only 5 \
  > "$out/check_fit.log" 2>&1 &
# Wider scan tiles for the bf16 states (measured last, if time is left).
tune="scan=512;scan=1024;low_states=0;low_states=3"
timeout 80 python3 benchmarks/triton_benchmark.py --warm nha,flex \
  --tune "$tune" > "$out/warm_nha.log" 2>&1 &
wait
grep -h "PASS\|FAIL\|Error\|losses" "$out"/check_*.log
tail -qn 1 "$out"/warm_*.log
echo "phase 1 done at ${SECONDS}s"

candidates=$(ls "$out"/fla_shard_*.json 2>/dev/null | paste -sd,)
FLA_TUNE_CANDIDATES="$candidates" FLA_UNTUNED_FALLBACK=1 \
FLA_RECORD_CONFIGS="$out/fla_configs_all.json" \
NHA_BENCH_GRAPHS=1 python3 benchmarks/triton_benchmark.py \
  --lengths 4096,16384,65536 --peers sdpa,flex,fla,tune --no-decode \
  --tune "$tune" --tune-length 65536 \
  --breakdown 65536,4096 --deadline $((160 - SECONDS)) \
  --json "$out/triton_benchmark.json" --plot "$out/triton_benchmark.png"
echo "measuring done at ${SECONDS}s"
# The opt-in cached launcher (KERAS_NHA_TRITON_FAST_LAUNCH) in a process
# of its own: new launch code must not cost the rows above.
NHA_BENCH_FAST_LAUNCH=1 timeout 25 python3 benchmarks/triton_benchmark.py \
  --lengths 4096,65536 --peers none --no-decode --breakdown "" \
  --json "$out/triton_fast_launch.json"
cat "$out"/check_*.log > "$out/triton_gpu_check.log"
echo "job done at ${SECONDS}s"
