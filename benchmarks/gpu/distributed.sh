#!/usr/bin/env bash
# GPU round job (both GPUs): distributed generate() (tokens against one GPU,
# decode speed, largest all-gather), then, with DIST_TRAIN=1, NHACausalLM
# training throughput on 1 GPU vs 2 GPUs (DataParallel) and a ModelParallel
# (1 x 2) run (about 100 s including compiles).
# The 1-GPU baselines run with only GPU 0 visible (with two visible devices
# the Pallas path already takes its multi-device route). Rows are appended
# to the JSON lines file as each run ends, so a run cut by the time limit
# still leaves the earlier rows. The portable "chunked" path runs first:
# in round 2 the Pallas kernels ("auto" on a GPU) hit the shared-memory
# limit at this size.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/distributed_out}
mkdir -p "$out"
echo "== generate(): 1 GPU, DataParallel and ModelParallel on 2"
python3 benchmarks/distributed_generate.py --devices 2 \
  --json "$out/distributed_generate_h200.jsonl"
[ -n "${DIST_TRAIN:-}" ] || exit 0
rows="$out/distributed_h200.jsonl"
bench() {
  python3 benchmarks/distributed_benchmark.py --size h200 --devices 2 \
    --warmup 2 --steps 6 --json "$rows" "$@"
}
echo "== 1 GPU (only GPU 0 visible)"
first_gpu=${CUDA_VISIBLE_DEVICES:-0}
CUDA_VISIBLE_DEVICES=${first_gpu%%,*} bench --runs chunked:single,auto:single
echo "== 2 GPUs"
bench --runs chunked:model,chunked:data,auto:data,auto:model \
  --plot "$out/distributed_h200.png"
