#!/usr/bin/env bash
# GPU round job "pallas" (one GPU, ~260 s wall clock including compiles).
#
# Most important rows first, each appended to $JOB_OUT/rows.jsonl as soon as
# it is measured, so a job cut off by the round's time limit keeps them.
# First the GPU check (fp32, model.fit with "auto", streaming, the strong-gates
# precision diagnosis next to the Triton kernel, bf16 at real sizes, fp16)
# for at most PALLAS_CHECK_S seconds (0: skip), then the benchmark. The
# table and plot can be redrawn from rows.jsonl if the job is cut off.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/pallas_job}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
check_s=${PALLAS_CHECK_S:-125}
if [ "$check_s" -gt 0 ]; then
  timeout -k 5 "$check_s" python3 tests/pallas_gpu_check.py \
    > "$out/pallas_gpu_check.log" 2>&1
  echo "gpu check rc=$?"
  tail -30 "$out/pallas_gpu_check.log"
fi
steps=${PALLAS_STEPS:-main:65536 nha:16384 nha:4096 breakdown:16384 candidates:16384 breakdown:65536 decode}
# shellcheck disable=SC2086  # the steps are words
timeout -k 5 "${PALLAS_BENCH_S:-125}" python3 benchmarks/pallas_benchmark.py \
  --part jax --steps $steps --jsonl "$out/rows.jsonl" > /dev/null
echo "benchmark rc=$?"
# The Triton job runs right before this one on the same GPU.
triton_json=$out/../triton/triton_benchmark.json
extra=()
[ -f "$triton_json" ] && extra=(--triton-json "$triton_json")
python3 benchmarks/pallas_benchmark.py --from-jsonl "$out/rows.jsonl" \
  "${extra[@]}" --plot "$out/pallas_benchmark.png" | tee "$out/table.txt"
