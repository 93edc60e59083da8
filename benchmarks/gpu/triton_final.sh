#!/usr/bin/env bash
# Final GPU correctness check of the Triton kernels (FINAL=1 run_round.sh):
# the issue's checks (dispatch, fp32 padded, fp16 M=0, torch.compile,
# model.fit) first, then bf16 at real size with the default tiles.
set -u
export KERAS_BACKEND=torch
python3 tests/triton_gpu_check.py --part issue
python3 tests/triton_gpu_check.py --part quick
