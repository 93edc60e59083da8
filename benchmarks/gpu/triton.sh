#!/usr/bin/env bash
# GPU round job for the NHA Triton kernels (issue 3): one H200, ~220 s.
# Phase 1 (parallel, <= 95 s): the GPU checks the issue asks for that never
# ran (fp32 padded, fp16 M=0, torch.compile, model.fit; one process each:
# they compile different kernels), and compiling what phase 2 runs (NHA
# under every tuning value, Flex, fla with its real autotuning at T=4096,
# the tuned configs recorded to fla_configs.json). Phase 2: one measuring
# process, every row of the table from this run, most important first.
set -u
export KERAS_BACKEND=torch
out=${JOB_OUT:-/tmp/triton_job}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
  > "$out/gpu.txt" 2>&1
echo "kernels: $(cat kernels/triton/*.py | sha1sum | cut -c1-12)"
# Variants measured at T=65536 with their per-part breakdown (phase 2),
# compiled in phase 1 by three processes (groups).
groups=("low_states=1;low_states=1,chunk=128,warps=8"
        "chunk=128,warps=8;low_states=1,scan_unroll=32"
        "stages=3;dkdv_query=64,dkdv_key=128,dkdv_warps=8"
        "query_bwd=128,key_bwd=64,dq_warps=8;query=128,key=64,window_warps=8")
tune=$(IFS=';'; echo "${groups[*]}")
# fla configs tuned in an earlier round on this card (same software).
tuned=benchmarks/results/triton_fla_configs_h200.json
cp "$tuned" "$out/fla_configs.json" 2>/dev/null ||
  echo "{}" > "$out/fla_configs.json"
export FLA_TUNED_CONFIGS="$out/fla_configs.json"

for only in 0,1 2 3 4 5 6; do
  timeout 95 python3 tests/triton_gpu_check.py --part issue --only $only \
    > "$out/check_$only.log" 2>&1 &
done
# Streaming (prefill in two calls, decode steps): the scan now writes the
# final states itself.
timeout 95 python3 tests/triton_gpu_check.py --part kernels --only 2 \
  > "$out/check_stream.log" 2>&1 &
# bf16 chunk states (the new Blocks.low_states) at real size, streaming.
for only in 1,0 2; do
  KERAS_NHA_TRITON_BLOCKS=low_states=1 timeout 95 python3 \
    tests/triton_gpu_check.py --part kernels --only $only \
    > "$out/check_low_states_$only.log" 2>&1 &
done
timeout 95 python3 benchmarks/triton_benchmark.py --warm nha,flex \
  > "$out/warm_nha.log" 2>&1 &
for i in "${!groups[@]}"; do
  timeout 95 python3 benchmarks/triton_benchmark.py --warm nha \
    --tune "${groups[$i]}" > "$out/warm_tune_$i.log" 2>&1 &
done
FLA_RECORD_CONFIGS="$out/fla_configs.json" timeout 95 \
  python3 benchmarks/triton_benchmark.py --warm fla --lengths 4096 \
  > "$out/warm_fla.log" 2>&1 &
wait
cat "$out"/check_*.log > "$out/triton_gpu_check.log"
grep -h "PASS\|FAIL\|Error\|losses" "$out"/check_*.log
tail -n 3 "$out"/warm_*.log
echo "phase 1 done at ${SECONDS}s"

# fla kernels phase 1 did not finish tuning are tuned here, and kept too.
export FLA_RECORD_CONFIGS="$out/fla_configs_all.json"
NHA_BENCH_GRAPHS=1 python3 benchmarks/triton_benchmark.py \
  --lengths 4096,16384,65536 --peers sdpa,flex,tune,fla --no-decode \
  --breakdown 65536,4096 --host-profile 4096 --tune "$tune" \
  --tune-length 65536 \
  --deadline $((200 - SECONDS)) \
  --json "$out/triton_benchmark.json" --plot "$out/triton_benchmark.png"
echo "job done at ${SECONDS}s"
