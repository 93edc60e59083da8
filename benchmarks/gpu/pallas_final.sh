#!/usr/bin/env bash
# Final GPU correctness check of the Pallas kernels (FINAL=1 run_round.sh):
# the first four checks (bf16 GQA, padded, strong gates, float32), then all.
set -u
export KERAS_BACKEND=jax
python3 tests/pallas_gpu_check.py --quick
python3 tests/pallas_gpu_check.py
