#!/usr/bin/env bash
# Final GPU correctness check of the Pallas kernels (FINAL=1 run_round.sh):
# every case once, most important first (bf16 GQA at real sizes, padded,
# strong gates, float32, model.fit, streaming, then the other shapes and
# fp16), so a cut-off run keeps the important ones.
set -u
export KERAS_BACKEND=jax
python3 tests/pallas_gpu_check.py --cases gqa padded strong fp32 fit \
  streaming fp16 w0 m0 d96 d256
