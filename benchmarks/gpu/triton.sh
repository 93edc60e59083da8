#!/usr/bin/env bash
# GPU round job for the NHA Triton kernels (issue 3): one H200, <= 230 s.
# Session 4. Phase 1 (parallel, <= 80 s): GPU checks of the new sequential
# state/adjoint passes (KERAS_NHA_TRITON_BLOCKS=sequential=1) and of the
# defaults, compiling what phase 2 measures, and fla's autotuning spread
# over ten processes (each compiles and times every tenth config of each
# kernel). Phase 2: one measuring process, every row from this run; fla's
# kernels are tuned there over the three fastest configs of the shards,
# timed again alone; then the variants at T=65536 with their breakdown.
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
seq="sequential=1"

for i in $(seq 0 $((shards - 1))); do
  FLA_TUNE_SHARD=$i/$shards FLA_SHARD_TIMINGS="$out/fla_shard_$i.json" \
    timeout 80 python3 benchmarks/triton_benchmark.py --warm fla \
    --lengths 4096 > "$out/warm_fla_$i.log" 2>&1 &
done
# The sequential passes: the benchmark's layout with GQA, shared q/k,
# streaming with padding, M=128 d=64 GQA 8/2, strong gates, W=0; fp32 padded.
for only in 0 1 2 3 4 5 7; do
  KERAS_NHA_TRITON_BLOCKS=$seq timeout 80 python3 tests/triton_gpu_check.py \
    --part kernels --only $only > "$out/check_seq_$only.log" 2>&1 &
done
# The defaults (host-side changes): the benchmark's layout, torch.compile
# and model.fit (the wrapper changed: return_state, fewer glue ops).
timeout 80 python3 tests/triton_gpu_check.py --part quick \
  > "$out/check_quick.log" 2>&1 &
for only in 4 5; do
  timeout 80 python3 tests/triton_gpu_check.py --part issue --only $only \
    > "$out/check_issue_$only.log" 2>&1 &
done
tune="$seq;$seq,state_tile=64;$seq,state_both=1;$seq,state_tile=16;$seq,fused_dx=1;$seq,state_stages=3;$seq,state_warps=8,state_tile=64"
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
  --lengths 4096,16384,65536 --peers tune,sdpa,flex,fla --no-decode \
  --tune "$tune" --tune-length 65536 \
  --breakdown 65536,4096 --host-profile 4096 --deadline $((188 - SECONDS)) \
  --json "$out/triton_benchmark.json" --plot "$out/triton_benchmark.png"
echo "measuring done at ${SECONDS}s"
# The sequential passes at the short lengths (fewer launches: CPU-bound).
KERAS_NHA_TRITON_BLOCKS=$seq timeout $((222 - SECONDS)) python3 \
  benchmarks/triton_benchmark.py --lengths 4096,16384 --peers none \
  --no-decode --breakdown 4096 --json "$out/triton_sequential.json"
cat "$out"/check_*.log > "$out/triton_gpu_check.log"
echo "job done at ${SECONDS}s"
