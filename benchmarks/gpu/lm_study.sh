#!/usr/bin/env bash
# LM study (issue 7) on one GPU, JAX backend, most important first:
# 1. training tokens/s (compile time apart) of the four same-budget variants
#    with the default kernels ("auto"), 2. their greedy decode ms/token and
#    cache bytes, 3. the same training timing on the portable chunked kernel,
# 4. the inference-time window search of the NHA model trained on the CPU
#    (validation text: this machine's Python stdlib, not the CPU's).
# Results are appended to $JOB_OUT as they are measured.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/lm_study_gpu}
mkdir -p "$out"
python3 --version
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python3 benchmarks/lm_study_speed.py --out "$out/speed.jsonl" \
  --plan train:auto,decode:auto,train:chunked
python3 benchmarks/lm_study_search.py --out "$out" \
  --results benchmarks/results/lm_study_cpu2_corpus_order_seed0.json \
  --weights benchmarks/results/lm_study_cpu2_corpus_order_seed0_nha.weights.h5 \
  --lengths 256 --decode-context 2048 --plot "$out/lm_window_search.png"
