#!/usr/bin/env bash
# MQAR sweep on one GPU (run by benchmarks/gpu/run_round.sh; $JOB_OUT is the
# output folder). One training process per setting, all sharing the GPU; each
# trains its seeds x learning rates vmapped in one jitted step on a mixture of
# pair counts, tests at every count, and appends a JSON line per run and count.
# Every process stops itself at $MQAR_DEADLINE seconds after this script
# started (then tests and writes its lines), so that the table and plot get
# written before the round's limit.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/mqar_out}
mkdir -p "$out"
deadline=${MQAR_DEADLINE:-430}
# Rounds 1-3 of session 2 (T=128/256, one pair count per run, no short
# convolution): docs/results_mqar.md; their script is this file at a78e8a6.
# The MQAR_* variables also serve a quick CPU dry run of this script.
steps=${MQAR_STEPS:-3000}
seq_len=${MQAR_SEQ_LEN:-256}
vocab=${MQAR_VOCAB:-512}
hidden=${MQAR_HIDDEN:-128}
# shellcheck disable=SC2206
pairs=(${MQAR_PAIRS:-8 16 32 64})
# shellcheck disable=SC2206
seeds=(${MQAR_SEEDS:-0 1})
# shellcheck disable=SC2206
lrs=(${MQAR_LRS:-1e-3 3e-3})
common=(--seq-len "$seq_len" --vocab "$vocab" --hidden "$hidden"
        --pairs "${pairs[@]}" --mixture --placement power --short-conv 3
        --seeds "${seeds[@]}" --lr "${lrs[@]}" --weight-decay 0.1
        --steps "$steps" --batch-size 64 --warmup "$((steps / 40))"
        --log-every 100 --eval-every "$((steps / 6))"
        --implementation chunked)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
  --format=csv -l 5 > "$out/gpu_usage.csv" 2>/dev/null &
monitor=$!

# A queue, most important first: the five settings at equal state (64 tokens
# per layer; full attention and the hybrid's global layer keep all T), then
# the state-size sweep. $MQAR_WORKERS processes share the GPU; a process that
# finishes hands its place to the next setting, so the fast settings make
# room for the slow ones. A setting starts only with 150 s or more left. An
# entry is "setting[:implementation[:lr,lr...]]": the kernel (default chunked;
# with M=32 the chunked slot pass took XLA over 6 minutes to compile on the
# H200 in round 1, the Pallas kernels of "auto" 45 s) and learning rates
# (default $MQAR_LRS).
# Round 1 (T=256, lr 3e-3, 1e-2, 3e-2) finished full, gsa-M64, swa-W64,
# hybrid-M64 and nha-M16-W16; 1e-2 and 3e-2 diverged at d_model 128, the
# windowed models preferred lower rates in the CPU probes. Round 2 adds lower
# rates to those and runs the rest of the sweep.
# shellcheck disable=SC2206
queue=(${MQAR_SETTINGS:-nha-M32-W32:auto gsa-M64:chunked:1e-3
       swa-W64:chunked:3e-4,1e-3 hybrid-M64:chunked:3e-4,1e-3 nha-M64-W64
       gsa-M32:auto nha-M16-W16:chunked:1e-3 swa-W32 nha-M8-W8 swa-W128
       gsa-M128 swa-W16 gsa-M16})
workers=${MQAR_WORKERS:-5}
# Throughput probe beside the queue: NHA with the Pallas kernels ("auto")
# against the chunked run of the same setting in the queue, both sharing the
# card (steps_per_s in their JSON lines).
if [ "${MQAR_PROBE:-0}" = 1 ]; then
  python3 benchmarks/mqar.py --settings nha-M32-W32 "${common[@]}" \
    --steps 300 --eval-every 0 --implementation auto \
    --time-limit "$((deadline / 2))" --output "$out/probe_pallas.jsonl" \
    > "$out/probe_pallas.log" 2>&1 &
fi
running=()
next=0
while [ $SECONDS -lt "$((deadline + 15))" ]; do
  alive=()
  for pid in "${running[@]}"; do
    kill -0 "$pid" 2>/dev/null && alive+=("$pid")
  done
  running=("${alive[@]}")
  while [ ${#running[@]} -lt "$workers" ] && [ $next -lt ${#queue[@]} ] &&
        [ $((deadline - SECONDS)) -ge 150 ]; do
    IFS=: read -r setting kernel rates <<< "${queue[$next]}"
    kernel=${kernel:-chunked}
    # shellcheck disable=SC2206
    rates=(${rates//,/ })
    [ ${#rates[@]} = 0 ] && rates=("${lrs[@]}")
    next=$((next + 1))
    echo "start $setting ($kernel, lr ${rates[*]}) at ${SECONDS}s"
    python3 benchmarks/mqar.py --settings "$setting" "${common[@]}" \
      --implementation "$kernel" --lr "${rates[@]}" \
      --time-limit "$((deadline - SECONDS - 30))" \
      --output "$out/mqar_runs_$setting.jsonl" \
      > "$out/train_$setting.log" 2>&1 &
    running+=($!)
  done
  [ ${#running[@]} = 0 ] && break
  sleep 2
done
for pid in "${running[@]}"; do kill "$pid" 2>/dev/null; done
kill "$monitor" 2>/dev/null
grep -h "step \|Error\|time limit" "$out"/train_*.log | tail -n 60
cat "$out"/mqar_runs_*.jsonl > "$out/mqar_runs.jsonl" 2>/dev/null
cat "$out"/mqar_runs_*.jsonl.progress > "$out/mqar_progress.jsonl" 2>/dev/null
python3 benchmarks/mqar.py --report "$out/mqar_runs.jsonl" \
  --table "$out/mqar_table.md" --plot "$out/mqar.png" \
  --curves "$out/mqar_progress.jsonl" "$out/mqar_curves.png"
echo "mqar job done at ${SECONDS}s"
