#!/usr/bin/env bash
# Final GPU correctness check of the Pallas kernels (FINAL=1 run_round.sh):
# every case once, most important first: the cases the session-5 defaults
# (factored and exact slot programs as two calls, slot dk/dv with 4 warps)
# change most: W=0 (the factored dk/dv kernels), strong gates (chunks of
# both kinds, GQA dk/dv), padded GQA, bf16 GQA at real sizes, streaming;
# then fp16, d=96/M=17, the 16-row design (float32, model.fit) and the
# rest, so a cut-off run keeps the important ones.
set -u
export KERAS_BACKEND=jax
python3 tests/pallas_gpu_check.py --cases w0 strong padded gqa streaming \
  fp16 d96 fp32 fit m0 d256
