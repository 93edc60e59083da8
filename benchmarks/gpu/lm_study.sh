#!/usr/bin/env bash
# LM study (issue 7) on one GPU, JAX backend. Rounds 1 and 2 measured speed
# (benchmarks/results/lm_study_speed_h200_round{1,2}.jsonl). This run trains
# the four same-budget variants 3x longer than the CPU study (1500 steps of
# 16 x 256 bytes, seed 0, shuffled rows), NHA and sliding window first (the
# pair the CPU runs could not separate). Validation text is this machine's
# Python 3.12 standard library: compare losses only within this run.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/lm_study_gpu}
mkdir -p "$out"
python3 --version
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python3 benchmarks/lm_study.py --variants "${LM_VARIANTS:-nha,swa,transformer,gsa}" \
  --steps "${LM_STEPS:-1500}" --eval-every "${LM_EVAL_EVERY:-500}" --seed 0 \
  --no-weights --out "$out" --plot "$out/lm_training_curves_h200.png"
