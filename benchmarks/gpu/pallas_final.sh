#!/usr/bin/env bash
# Final GPU job of the Pallas kernels (FINAL=1 run_round.sh, ~170 s).
#
# 1. (~40 s, at most 50) The shipped defaults' T=65536 fwd / fwd+bwd rows
#    against cuDNN causal in one process (a second measurement of the s6r1
#    numbers; each row the median of 7 samples of 5 back-to-back calls).
# 2. (the rest) The GPU correctness check, every case once, the code paths
#    session 6 added first (s6r1 checked "lag", "gqa", "padded", "shared"):
#    a fresh sequence (no state given) reads the new tokens in place, and
#    the window kernels add the slots' gradients of the arrays both read.
#      shared  W=256, the window reads the slot queries and keys: slot
#              keys, values and gates read W rows behind; dq, dk, dv
#              added inside
#      fit     model.fit through NHALayer, implementation="auto"
#      m0      no slots: the window alone over the new tokens in place
#      d256    W >= T, 32-row window blocks: no feed, window in place
#      d96     W=64, GQA 4:1, padded head dims and slots: in place
#      strong  W=200 (fed stream copied), GQA, factored and exact chunks
#      fp16    W=200, exact in-chunk terms only
#      fp32    the 16-row design: fed stream copied, window in place
#      streaming  a given state (session 5's path), then decode steps
#      lag, gqa, padded (passed in s6r1), w0
#    The strong-gates case skips its extra reference runs (time).
set -u
export KERAS_BACKEND=jax
limit=${JOB_LIMIT_S:-170}
out=${JOB_OUT:-/tmp/pallas_final}
mkdir -p "$out"
timeout -k 5 "${PALLAS_FINAL_BENCH_S:-50}" python3 \
  benchmarks/pallas_benchmark.py --part jax --steps main:65536 \
  --jsonl "$out/rows.jsonl" > /dev/null
echo "benchmark rc=$?"
[ -f "$out/rows.jsonl" ] && python3 benchmarks/pallas_benchmark.py \
  --from-jsonl "$out/rows.jsonl"
timeout -k 5 $(( limit - SECONDS - 8 )) python3 tests/pallas_gpu_check.py \
  --no-diagnose --cases shared fit m0 d256 d96 strong fp16 fp32 streaming \
  lag gqa padded w0
echo "gpu check rc=$?"
