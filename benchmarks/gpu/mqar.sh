#!/usr/bin/env bash
# MQAR sweep on one GPU (run by benchmarks/gpu/run_round.sh; $JOB_OUT is the
# output folder). Several training processes share the GPU; each trains its
# settings one after another, every setting's pair counts x seeds vmapped in
# one jitted step, and appends a JSON line per finished run. Processes still
# running at $MQAR_DEADLINE seconds are stopped so that the table and plot get
# written before the round's limit.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/mqar_out}
mkdir -p "$out"
deadline=${MQAR_DEADLINE:-255}
# The MQAR_* variables exist for a quick CPU dry run of this script.
steps=${MQAR_STEPS:-3000}
seq_len=${MQAR_SEQ_LEN:-256}
vocab=${MQAR_VOCAB:-8192}
probe_steps=${MQAR_PROBE_STEPS:-300}
# shellcheck disable=SC2206
pairs=(${MQAR_PAIRS:-16 32 64})
common=(--seq-len "$seq_len" --vocab "$vocab" --pairs "${pairs[@]}"
        --seeds 0 1 --steps "$steps" --batch-size 64 --lr 3e-3
        --warmup "$((steps / 15))" --log-every 250
        --eval-every "$((steps / 6))" --implementation chunked)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
  --format=csv -l 5 > "$out/gpu_usage.csv" 2>/dev/null &
monitor=$!

# Most important first: each process starts with one of the five settings,
# then the equal-state variants (state per layer: M + W tokens).
groups=(
  "nha-M64-W64 nha-M32-W32 nha-M16-W16"
  "gsa-M64 gsa-M128 gsa-M32"
  "swa-W64 swa-W128 swa-W32"
  "full nha-M8-W8"
  "hybrid-M64 gsa-M16 swa-W16"
)
pids=()
for i in "${!groups[@]}"; do
  # shellcheck disable=SC2086
  python3 benchmarks/mqar.py --settings ${groups[$i]} "${common[@]}" \
    --output "$out/mqar_runs_$i.jsonl" > "$out/train_$i.log" 2>&1 &
  pids+=($!)
done
# Learning-rate check: full attention, the most pairs, seed 0, at a third
# and at three times the main learning rate (kept out of the main table).
python3 benchmarks/mqar.py --settings full "${common[@]}" --lr 1e-3 1e-2 \
  --pairs "${pairs[-1]}" --seeds 0 \
  --output "$out/mqar_lr_check.jsonl" > "$out/train_lr_check.log" 2>&1 &
pids+=($!)
# Pallas ("auto") against "chunked": short timing runs of the NHA setting.
( for impl in auto chunked; do
    python3 benchmarks/mqar.py --settings nha-M64-W64 --seq-len "$seq_len" \
      --vocab "$vocab" --pairs "${pairs[-1]}" --seeds 0 \
      --steps "$probe_steps" --log-every 100 \
      --implementation $impl --output "$out/mqar_probe_$impl.jsonl"
  done ) > "$out/probe.log" 2>&1 &
pids+=($!)

while [ $SECONDS -lt "$deadline" ]; do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 2
done
for pid in "${pids[@]}"; do
  pkill -P "$pid" 2>/dev/null; kill "$pid" 2>/dev/null
done
kill "$monitor" 2>/dev/null
grep -h "step \|Error" "$out"/train_*.log "$out/probe.log" | tail -n 60
cat "$out"/mqar_runs_*.jsonl > "$out/mqar_runs.jsonl" 2>/dev/null
cat "$out"/mqar_runs_*.jsonl.progress > "$out/mqar_progress.jsonl" 2>/dev/null
python3 benchmarks/mqar.py --report "$out/mqar_runs.jsonl" \
  --table "$out/mqar_table.md" --plot "$out/mqar.png" \
  --curves "$out/mqar_progress.jsonl" "$out/mqar_curves.png"
echo "mqar job done at ${SECONDS}s"
