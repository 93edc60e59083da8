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
deadline=${MQAR_DEADLINE:-220}
# Round 2 (round 1, T=256 / vocabulary 8192 / 3000 steps, learned nothing:
# see docs/results_mqar.md; its script is this file at commit 84da65a).
# The MQAR_* variables also serve a quick CPU dry run of this script.
steps=${MQAR_STEPS:-4000}
seq_len=${MQAR_SEQ_LEN:-128}
vocab=${MQAR_VOCAB:-512}
# shellcheck disable=SC2206
pairs=(${MQAR_PAIRS:-8 16 32})
common=(--seq-len "$seq_len" --vocab "$vocab" --pairs "${pairs[@]}"
        --seeds 0 1 --steps "$steps" --batch-size 64 --lr 3e-3
        --warmup "$((steps / 20))" --log-every 250
        --eval-every "$((steps / 4))" --implementation chunked)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
  --format=csv -l 5 > "$out/gpu_usage.csv" 2>/dev/null &
monitor=$!

# Round 3 (250 s): GSA at the equal state, alone on the card (in round 2 it
# shared the card with five others and got no checkpoint). Round 2's groups:
# "nha-M32-W32 nha-M16-W16" "gsa-M64 gsa-M32" "swa-W64 swa-W32"
# "full nha-M8-W8" "nha-M64-W64 gsa-M16" "hybrid-M64 swa-W16".
groups=(
  "gsa-M64 gsa-M32"
)
pids=()
for i in "${!groups[@]}"; do
  # shellcheck disable=SC2086
  python3 benchmarks/mqar.py --settings ${groups[$i]} "${common[@]}" \
    --output "$out/mqar_runs_$i.jsonl" > "$out/train_$i.log" 2>&1 &
  pids+=($!)
done

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
grep -h "step \|Error" "$out"/train_*.log | tail -n 60
cat "$out"/mqar_runs_*.jsonl > "$out/mqar_runs.jsonl" 2>/dev/null
cat "$out"/mqar_runs_*.jsonl.progress > "$out/mqar_progress.jsonl" 2>/dev/null
python3 benchmarks/mqar.py --report "$out/mqar_runs.jsonl" \
  --table "$out/mqar_table.md" --plot "$out/mqar.png" \
  --curves "$out/mqar_progress.jsonl" "$out/mqar_curves.png"
echo "mqar job done at ${SECONDS}s"
