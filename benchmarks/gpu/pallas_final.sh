#!/usr/bin/env bash
# Final GPU correctness check of the Pallas kernels (FINAL=1 run_round.sh,
# ~170 s): every case once, most important first: session 6's fresh
# sequences (no state given: the window and the slots read the new tokens
# in place; "shared", "lag" and "gqa" have W a multiple of the chunk, so
# the slot keys, values and gates are read W rows behind, and the window
# kernels add the slots' gradients: dv, and dq / dk in "shared", where
# the window reads the slot queries and keys), then the session-5 defaults'
# cases (strong gates: chunks of both kinds, GQA dk/dv), streaming from a
# given state, fp16, d=96/M=17, W=0, the 16-row design (float32,
# model.fit) and the rest, so a cut-off run keeps the important ones.
# With the time left, the T=65536 fwd / fwd+bwd rows against cuDNN (a
# second measurement of the shipped defaults).
set -u
export KERAS_BACKEND=jax
limit=${JOB_LIMIT_S:-170}
timeout -k 5 $(( limit - 45 )) python3 tests/pallas_gpu_check.py --cases \
  shared lag gqa padded strong streaming d96 w0 fp16 fp32 fit m0 d256
echo "gpu check rc=$?"
out=${JOB_OUT:-/tmp/pallas_final}
mkdir -p "$out"
left=$(( limit - SECONDS - 8 ))
if [ "$left" -gt 20 ]; then
  timeout -k 5 "$left" python3 benchmarks/pallas_benchmark.py --part jax \
    --steps main:65536 --jsonl "$out/rows.jsonl" > /dev/null
  echo "benchmark rc=$?"
  [ -f "$out/rows.jsonl" ] && cat "$out/rows.jsonl"
fi
