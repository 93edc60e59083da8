#!/usr/bin/env bash
# MQAR on one GPU (run by benchmarks/gpu/run_round.sh; $JOB_OUT is the output
# folder). One training process per setting, all sharing the GPU; each trains
# its seeds (x learning rates) vmapped, many steps per jitted call with the
# batches generated on the device, on a mixture of pair counts, tests at
# every count and appends a JSON line per run and count (checkpoints in
# *.progress). Every process stops itself at $MQAR_DEADLINE seconds after
# this script started, then tests and writes its lines.
#
# Session 5: the issue's five settings at their literal sizes (nha-M64-W64,
# gsa-M64, swa-W64, full, hybrid-M64) at T = 512 on this GPU (T = 1024 on
# the second one: mqar2.sh), two seeds each, and at T = 512 also NHA at the
# state of gsa-M64 and swa-W64 (nha-M32-W32), trained over rounds 1 and 2
# (planned, checkpointed, resumed), plus a lever for NHA's slots at T = 256
# (--window-off-steps 1000 and 3000) on seeds paired with session 4's
# round 3.
# Session 4's job (T = 256, 32 and 64 tokens per layer): this file at 02d975b.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/mqar_out}
mkdir -p "$out/resume"
deadline=${MQAR_DEADLINE:-$((${JOB_LIMIT_S:-460} - 30))}
# (s5r2 found no checkpoints: the git-ignored mqar_s5_resume did not travel
# with the working tree, so the final round reads an untracked, never
# committed copy of round 1's checkpoints in mqar_s5_carry.)
resume_dir=${MQAR_RESUME_DIR:-benchmarks/results/mqar_s5_carry}
[ -d "$resume_dir" ] || resume_dir=benchmarks/results/mqar_s5_resume
# The MQAR_* variables also serve a quick CPU dry run of this script.
steps=${MQAR_STEPS:-200000}        # upper bound; the plan sets the length
warmup=${MQAR_WARMUP:-300}
next_round=${MQAR_NEXT_S:-0}   # seconds of training a next round adds
seq_len=${MQAR_SEQ_LEN:-512}
vocab=${MQAR_VOCAB:-1024}
hidden=${MQAR_HIDDEN:-128}
# shellcheck disable=SC2206
pairs=(${MQAR_PAIRS:-16 32 64 128})
# shellcheck disable=SC2206
seeds=(${MQAR_SEEDS:-0 1})
common=(--seq-len "$seq_len" --vocab "$vocab" --hidden "$hidden"
        --pairs "${pairs[@]}" --placement power --short-conv 3
        --seeds "${seeds[@]}" --weight-decay 0.1 --batch-size 64
        --warmup "$warmup" --log-every "${MQAR_LOG_EVERY:-100}"
        --steps-per-call "${MQAR_PER_CALL:-100}"
        --resume-warmup "${MQAR_REWARM:-100}")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
  --format=csv -l 5 > "$out/gpu_usage.csv" 2>/dev/null &
monitor=$!

# setting:kernel:lr[,lr]:chunk_size:steps[:seeds[:warmup[:extra]]] ("-" for
# steps: planned, checkpointed and resumed from $resume_dir when there; seeds
# comma-separated, default $MQAR_SEEDS; extra: more mqar.py arguments,
# commas for spaces, later ones replacing the common ones). Learning rates:
# each setting's best of session 3 (3e-3; 1e-3 for the window and the
# hybrid), warmup 75 (what full attention needs; session 4, round 2).
# Session 4 (T = 256): rounds at e3dda3d, 60f39b5 and ceccb7b.
# Round 1 (commit 767c6a8) ran the sweep with the lever on seeds 2-5
# (--window-off-steps 1000 and 3000, 8000-step schedules, stopped at 3300
# and 3800 steps by the time limit). Round 2: the sweep resumed (and planned
# again over round 2 and the final round: --replan), the lever with 3000
# steps on new seeds 6-9 beside the same runs without it (compared at equal
# steps; not checkpointed: the returned files' limit), at commit c40134c.
# Final round (s5r3): the sweep alone, resumed, to the end of its plan.
t256=--seq-len,256,--vocab,512,--pairs,8,16,32,64
# shellcheck disable=SC2206
queue=(${MQAR_SETTINGS:-nha-M64-W64:chunked:3e-3:16:-:0,1:75
       gsa-M64:chunked:3e-3:16:-:0,1:75
       swa-W64:chunked:1e-3:16:-:0,1:75
       full:chunked:3e-3:16:-:0,1:75
       hybrid-M64:chunked:1e-3:16:-:0,1:75
       nha-M32-W32:chunked:3e-3:16:-:0,1:75})
# Throughput probes beside the queue (no tests, no checkpoint), e.g. round
# 1's: nha-M16-W16:chunked:3e-3:8 (also :16, :32), nha-M16-W16:pallas:3e-3:16,
# nha-M16-W16:chunked:3e-3:16:noautotune (XLA without GEMM autotuning),
# nha-M16-W16:chunked:3e-3:16:bf16 (bfloat16 compute), gsa-M32:chunked:3e-3:16.
# setting:kernel:lr:chunk_size[:noautotune|bf16]
# shellcheck disable=SC2206
probes=(${MQAR_PROBES:-})
pids=()
index=0
for entry in "${queue[@]}"; do
  index=$((index + 1))
  IFS=: read -r setting kernel rates chunk length run_seeds run_warmup extra \
    <<< "$entry"
  # shellcheck disable=SC2206
  rates=(${rates//,/ })
  args=(--settings "$setting" "${common[@]}" --implementation "$kernel"
        --lr "${rates[@]}" --chunk-size "$chunk"
        --time-limit "$((deadline - SECONDS - 30))"
        --output "$out/mqar_runs_$setting${extra:+_extra$index}.jsonl")
  # shellcheck disable=SC2206
  [ -n "${run_seeds:-}" ] && args+=(--seeds ${run_seeds//,/ })
  [ -n "${run_warmup:-}" ] && args+=(--warmup "$run_warmup")
  # shellcheck disable=SC2206
  [ -n "${extra:-}" ] && args+=(${extra//,/ })
  # Planned entries (and fixed ones with MQAR_SAVE=1) are checkpointed (int8:
  # two jobs of ten runs or more fit the round's returned files) and resumed
  # from $resume_dir when there.
  name=
  if [ "$length" = - ]; then
    name=${setting}_T$seq_len.npz
    args+=(--steps "$steps" --eval-every "${MQAR_EVAL_EVERY:-500}"
           --plan-seconds "$((deadline - SECONDS - 30 + next_round))"
           --plan-after "${MQAR_PLAN_AFTER:-150}" --replan)
  else
    args+=(--steps "$length" --eval-every "$((length / 8))")
    [ "${MQAR_SAVE:-0}" = 1 ] &&
      name=${setting}_s${run_seeds//,/}_$(tr -cd 'a-z0-9' <<< "$extra").npz
  fi
  if [ -n "$name" ]; then
    args+=(--checkpoint "$out/resume/$name" --checkpoint-bits 8)
    [ -f "$resume_dir/$name" ] && args+=(--resume "$resume_dir/$name")
  fi
  echo "start $entry at ${SECONDS}s"
  python3 benchmarks/mqar.py "${args[@]}" \
    > "$out/train_$setting${extra:+_extra$index}.log" 2>&1 &
  pids+=($!)
done
index=0
for entry in "${probes[@]}"; do
  IFS=: read -r setting kernel rates chunk flags <<< "$entry"
  index=$((index + 1))
  xla_flags=${XLA_FLAGS:-}
  [ "$flags" = noautotune ] && xla_flags="$xla_flags --xla_gpu_autotune_level=0"
  policy=float32
  [ "$flags" = bf16 ] && policy=mixed_bfloat16
  echo "probe $entry at ${SECONDS}s"
  XLA_FLAGS=$xla_flags python3 benchmarks/mqar.py --settings "$setting" "${common[@]}" \
    --implementation "$kernel" --lr "${rates//,/ }" --chunk-size "$chunk" \
    --dtype-policy "$policy" \
    --steps "$steps" --stop-at "${MQAR_PROBE_STEPS:-1000}" --eval-every 0 \
    --eval-batches 1 --time-limit "$((deadline / 2))" \
    --output "$out/probe_$index.jsonl" > "$out/probe_$index.log" 2>&1 &
  pids+=($!)
done
while [ $SECONDS -lt "$((deadline + 15))" ]; do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 2
done
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
kill "$monitor" 2>/dev/null
# The JSON lines are in the result files: the logs keep the rest.
for log in "$out"/train_*.log "$out"/probe_*.log; do
  [ -f "$log" ] && grep -v '^PROGRESS \|^RESULT ' "$log" > "$log.tmp" &&
    mv "$log.tmp" "$log"
done
grep -h "planned\|resumed\|time limit\|Error" "$out"/train_*.log
grep -h "steps/s" "$out"/probe_*.log | tail -n 6
cat "$out"/mqar_runs_*.jsonl > "$out/mqar_runs.jsonl" 2>/dev/null
cat "$out"/mqar_runs_*.jsonl.progress 2>/dev/null |
  gzip > "$out/mqar_progress.jsonl.gz"
cat "$out"/probe_*.jsonl > "$out/mqar_probes.jsonl" 2>/dev/null
rm -f "$out"/mqar_runs_*.jsonl "$out"/mqar_runs_*.jsonl.progress
# Figures only with MQAR_PLOTS=1 (they are drawn again from the JSON lines
# where the results arrive; the returned files are limited).
figures=()
[ "${MQAR_PLOTS:-0}" = 1 ] && figures=(--plot "$out/mqar.png")
python3 benchmarks/mqar.py --report "$out/mqar_runs.jsonl" \
  --table "$out/mqar_table.md" "${figures[@]}"
python3 benchmarks/mqar.py --report "$out/mqar_probes.jsonl" \
  --table "$out/mqar_probes_table.md"
du -sh "$out"
echo "mqar job done at ${SECONDS}s"
