#!/usr/bin/env bash
# GPU round job (both GPUs, 120 s including compiles): NHACausalLM training
# throughput on 1 GPU vs 2 GPUs (DataParallel) and a ModelParallel (1 x 2) run.
# Rows are appended to the JSON lines file as each run ends, so a run cut by
# the time limit still leaves the earlier rows.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/distributed_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python3 benchmarks/distributed_benchmark.py --size h200 --devices 2 \
  --warmup 3 --steps 10 \
  --runs auto:single,auto:data,auto:model,chunked:single,chunked:data \
  --json "$out/distributed_h200.jsonl" --plot "$out/distributed_h200.png"
