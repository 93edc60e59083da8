#!/usr/bin/env bash
# LM study (issue 7) on one GPU, JAX backend: training tokens/s (compile time
# apart) and greedy decode ms/token of the four same-budget variants, then
# the same training timing on the portable chunked kernel. Results are
# appended to $JOB_OUT/speed.jsonl as they are measured.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/lm_study_gpu}
mkdir -p "$out"
python3 --version
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python3 benchmarks/lm_study_speed.py --out "$out/speed.jsonl" \
  --phases train,decode --implementation auto
python3 benchmarks/lm_study_speed.py --out "$out/speed.jsonl" \
  --phases train --implementation chunked
