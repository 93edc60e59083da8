#!/usr/bin/env bash
# Final GPU correctness check of the Pallas kernels (FINAL=1 run_round.sh):
# every case once, most important first: bf16 GQA at real sizes, padded,
# strong gates, then the cases of the session-4 kernels round s4r2 did not
# reach (streaming, W=0, d=96/M=17), fp16, then the 16-row design (float32,
# model.fit) and the rest, so a cut-off run keeps the important ones.
set -u
export KERAS_BACKEND=jax
python3 tests/pallas_gpu_check.py --cases gqa padded strong streaming w0 \
  d96 fp16 fp32 fit m0 d256
