#!/usr/bin/env bash
# GPU round job "pallas" (one GPU, ~230 s wall clock including compiles).
#
# Most important rows first, each appended to $JOB_OUT/rows.jsonl as soon as
# it is measured, so a job cut off by the round's time limit keeps them.
# 1. The GPU check, cases named in PALLAS_CASES, for at most PALLAS_CHECK_S
#    seconds (0: skip).
# 2. Its cases PALLAS_CANDIDATE_CASES under the KernelConfig changes
#    PALLAS_CANDIDATE (empty: skip).
# 3. The benchmark steps PALLAS_STEPS for the rest of the job's time
#    ($JOB_LIMIT_S), or PALLAS_BENCH_S seconds.
# The table and plot can be redrawn from rows.jsonl if the job is cut off.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/pallas_job}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# Session 6: a fresh sequence reads the new tokens in place. Its cases
# first: "lag" and "gqa" (W a multiple of the chunk: slot keys and values
# read W rows behind), "padded" and "strong" (W=100 / 200: the window in
# place, the fed stream a delayed copy), all with GQA.
cases=${PALLAS_CASES:-lag gqa padded strong}
check_s=${PALLAS_CHECK_S:-55}
if [ "$check_s" -gt 0 ]; then
  # shellcheck disable=SC2086  # the cases are words
  timeout -k 5 "$check_s" python3 tests/pallas_gpu_check.py --cases $cases \
    > "$out/pallas_gpu_check.log" 2>&1
  echo "gpu check rc=$?"
  tail -30 "$out/pallas_gpu_check.log"
fi
# A KernelConfig change to check (a Python dict expression), e.g.
# PALLAS_CANDIDATE='dict(state_tiles=4)'; empty: skip.
candidate=${PALLAS_CANDIDATE-dict(grads_into_window=True)}
if [ -n "$candidate" ]; then
  # shellcheck disable=SC2086  # the cases are words
  timeout -k 5 "${PALLAS_CANDIDATE_S:-40}" python3 tests/pallas_gpu_check.py \
    --config "$candidate" --cases ${PALLAS_CANDIDATE_CASES:-shared lag} \
    > "$out/pallas_gpu_check_candidate.log" 2>&1
  echo "candidate check rc=$?"
  tail -8 "$out/pallas_gpu_check_candidate.log"
fi
# nha:4096 first: the first row a job times reads high (s5r1, s5r2).
# "given": the same call from an explicit zero state (session 5's path).
steps=${PALLAS_STEPS:-nha:4096 main:65536 given:65536 candidates:65536:3 nha:16384 breakdown:65536 given:16384}
# What is left of the job's limit, less ~25 s for the table and plot.
bench_s=${PALLAS_BENCH_S:-$(( ${JOB_LIMIT_S:-230} - SECONDS - 25 ))}
echo "benchmark budget ${bench_s}s"
# shellcheck disable=SC2086  # the steps are words
timeout -k 5 "$bench_s" python3 benchmarks/pallas_benchmark.py \
  --part jax --steps $steps --jsonl "$out/rows.jsonl" > /dev/null
echo "benchmark rc=$?"
# The Triton job's own rows (another GPU of the same host since s4r2); the
# "triton (same job)" rows above are the ratio of record.
triton_json=$out/../triton/triton_benchmark.json
extra=()
[ -f "$triton_json" ] && extra=(--triton-json "$triton_json")
python3 benchmarks/pallas_benchmark.py --from-jsonl "$out/rows.jsonl" \
  "${extra[@]}" --plot "$out/pallas_benchmark.png" \
  --plot-variants "$out/pallas_variants.png" | tee "$out/table.txt"
