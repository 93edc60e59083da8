#!/usr/bin/env bash
# LM study (issue 7) on one GPU, JAX backend, most important first.
# (Training with lm_study.py cannot run there: keras-hub needs grain or
# TensorFlow to feed NumPy arrays to fit(); round 3 failed on that.)
# Round 1 measured the training shape of the CPU study (16 x 256 bytes) and
# batch-1 decoding (results in benchmarks/results/lm_study_speed_h200_*).
# This run measures where the variants differ: long sequences and batched
# decoding with long caches.
# 1. training tokens/s (compile time apart) of the four same-budget variants
#    at 2 x 8192 tokens with the default kernels ("auto" = Pallas here),
# 2. greedy decode, 64 sequences at once, caches sized for 8192 tokens,
# 3. the same training timing on the portable chunked kernel.
# Results are appended to $JOB_OUT/speed.jsonl as they are measured.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/lm_study_gpu}
mkdir -p "$out"
python3 --version
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python3 benchmarks/lm_study_speed.py --out "$out/speed.jsonl" \
  --plan train:auto,decode:auto,train:chunked --shapes "${LM_SHAPES:-2x8192}" \
  --decode-batch "${LM_DECODE_BATCH:-64}" \
  --decode-context "${LM_DECODE_CONTEXT:-8192}"
