#!/usr/bin/env bash
# MQAR on one GPU (run by benchmarks/gpu/run_round.sh; $JOB_OUT is the output
# folder, $JOB_LIMIT_S the seconds before the job is killed).
#
# Session 6 (one H200 alone, rounds s6m1 and s6m2): at T = 256, the lever
# for NHA's slots (window closed for the first 3000 steps) on seeds 2-13,
# NHA without it and GSA at the same state on seeds 6-13 (seeds 2-5 of
# both: session 4's round 3), all on the full 8000-step schedule, plus full
# attention (seeds 2-5) and the lever at 64 tokens per layer; every model
# is then tested at T = 512, 1024 and 2048 with up to 255 pairs
# (--transfer-lengths: no training at those lengths), as are the
# checkpoints of sessions 4 and 5 that learned; session 4's NHA and GSA
# runs that learned are fine-tuned at T = 1024. Round s6m2 resumes what
# s6m1 did not finish and fine-tunes the best runs at a longer T.
# Sessions 4 and 5's jobs: this file at 02d975b (T = 256) and 7d808c7.
set -u
export KERAS_BACKEND=jax
out=${JOB_OUT:-/tmp/mqar_out}
mkdir -p "$out/resume"
deadline=${MQAR_DEADLINE:-$((${JOB_LIMIT_S:-480} - 30))}
# Git-ignored: the lead carries this folder to the GPU machine.
resume_dir=${MQAR_RESUME_DIR:-benchmarks/results/mqar_s6_resume}
# The MQAR_* variables also serve a quick CPU dry run of this script.
per_call=${MQAR_PER_CALL:-100}
eval_every=${MQAR_EVAL_EVERY:-1000}
margin=${MQAR_MARGIN:-45}   # seconds left for the final tests
# shellcheck disable=SC2206
lengths=(${MQAR_TRANSFER_LENGTHS:-512 1024 2048})
# shellcheck disable=SC2206
transfer_pairs=(${MQAR_TRANSFER_PAIRS:-16 32 64 128 255})
t256=(--seq-len "${MQAR_SEQ_LEN:-256}" --vocab "${MQAR_VOCAB:-512}"
      --pairs ${MQAR_PAIRS:-8 16 32 64})
common=(--hidden "${MQAR_HIDDEN:-128}" --placement power --short-conv 3
        --weight-decay 0.1 --batch-size "${MQAR_BATCH:-64}" --warmup 75
        --log-every "${MQAR_LOG_EVERY:-100}" --steps-per-call "$per_call"
        --resume-warmup 100 --implementation chunked
        --chunk-size "${MQAR_CHUNK:-16}" --eval-batches "${MQAR_EVAL_BATCHES:-8}"
        --transfer-lengths "${lengths[@]}"
        --transfer-pairs "${transfer_pairs[@]}"
        --transfer-sequences "${MQAR_TRANSFER_SEQUENCES:-256}")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader \
  > "$out/gpu.txt" 2>/dev/null
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
  --format=csv -l 5 > "$out/gpu_usage.csv" 2>/dev/null &
monitor=$!

# Training: name:setting:lr:steps:seeds[:extra] (seeds and extra mqar.py
# arguments with commas for spaces; extra ones replace the common ones,
# e.g. --init-from,FILE,--seq-len,1024,--tag,ft1024 to fine-tune).
# Each is checkpointed to $out/resume/<name>.npz and resumed from
# $resume_dir/<name>.npz when there (to the end of its schedule).
steps=${MQAR_STEPS:-8000}
# Fine-tuning at T = 1024 (then tested at 512 and 2048): a learned run's
# weights, a schedule of its own planned over the time left.
ft1024=--seq-len,1024,--pairs,16,32,64,128,255,--init-from
woff=--window-off-steps,${MQAR_WOFF:-3000}
# Round s6m1 (00:09 UTC, commit 046ceae) ran, beside each other: lever_a
# (seeds 2-7) and lever_b (8-13) with $woff, nolever (6-13), gsa (gsa-M32,
# 6-13), lever64 (nha-M32-W32 with $woff, 2-5), full (4000 steps, 2-5) and
# session 4's learned NHA (seed 0) and GSA (seed 1) fine-tuned at T = 1024
# (--init-from, planned); the card was saturated (100% busy) and the T = 256
# runs reached 1200-3700 of 8000 steps. Round s6m2 (the last) gives the
# whole card to the lever comparison: the 12 lever runs and the 8 without
# it, resumed to 8000 steps.
# shellcheck disable=SC2206
queue=(${MQAR_QUEUE:-lever_a:nha-M16-W16:3e-3:$steps:2,3,4,5,6,7:$woff
       lever_b:nha-M16-W16:3e-3:$steps:8,9,10,11,12,13:$woff
       nolever:nha-M16-W16:3e-3:$steps:6,7,8,9,10,11,12,13})
# Tests only (one after the other, beside the training): name:setting:
# checkpoint in $resume_dir:seeds:its recipe (commas for spaces).
t256c=--seq-len,256,--vocab,512,--pairs,8,16,32,64,--tag,s4
t512c=--seq-len,512,--vocab,1024,--pairs,16,32,64,128,--transfer-pairs,16,32,64,128,256,--tag,s5
# shellcheck disable=SC2206
# (s6m1 tested s4_nha, s4_gsa, s4_swa and s4_hybrid with $t256c, s5_full512
# with $t512c; s5_swa512 and s5_hybrid512 did not fit. s6m2 tests nothing.)
tests=(${MQAR_TESTS:-})

pids=()
: > "$out/resume/labels.txt"
for entry in "${queue[@]}"; do
  IFS=: read -r name setting rate length seeds extra <<< "$entry"
  label=$setting
  [[ ${extra:-} =~ --window-off-steps,([0-9]+) ]] &&
    label=$setting+woff${BASH_REMATCH[1]}
  [[ ${extra:-} =~ --tag,([A-Za-z0-9_]+) ]] && label=$label+${BASH_REMATCH[1]}
  # Steps "-": the schedule's length is what the rate measured after
  # --plan-after seconds fits into the time left.
  schedule=(--steps "$length")
  [ "$length" = - ] && schedule=(--steps 200000 --plan-after
    "${MQAR_PLAN_AFTER:-90}" --plan-seconds "$((deadline - SECONDS - margin))")
  # shellcheck disable=SC2206
  args=(--settings "$setting" "${t256[@]}" "${common[@]}" --lr "$rate"
        "${schedule[@]}" --seeds ${seeds//,/ } --eval-every "$eval_every"
        --time-limit "$((deadline - SECONDS - margin))"
        --checkpoint "$out/resume/$name.npz" --checkpoint-bits 8
        --output "$out/mqar_runs_$name.jsonl")
  # shellcheck disable=SC2206
  [ -n "${extra:-}" ] && args+=(${extra//,/ })
  [ -f "$resume_dir/$name.npz" ] && args+=(--resume "$resume_dir/$name.npz")
  echo "$out/resume/$name.npz:$label" >> "$out/resume/labels.txt"
  echo "start $entry at ${SECONDS}s"
  python3 benchmarks/mqar.py "${args[@]}" > "$out/train_$name.log" 2>&1 &
  pids+=($!)
done
(
  for entry in "${tests[@]}"; do
    IFS=: read -r name setting file seeds trained <<< "$entry"
    [ -f "$resume_dir/$file" ] || { echo "no $resume_dir/$file"; continue; }
    [ $SECONDS -lt "$((deadline - 40))" ] || break
    echo "test $entry at ${SECONDS}s"
    # shellcheck disable=SC2206
    python3 benchmarks/mqar.py --settings "$setting" "${common[@]}" \
      ${trained//,/ } --seeds ${seeds//,/ } --test-only \
      --init-from "$resume_dir/$file" --output "$out/mqar_runs_$name.jsonl" \
      > "$out/test_$name.log" 2>&1
  done
) &
pids+=($!)
while [ $SECONDS -lt "$((deadline + 15))" ]; do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 2
done
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
kill "$monitor" 2>/dev/null
# The JSON lines are in the result files: the logs keep the rest.
for log in "$out"/train_*.log "$out"/test_*.log; do
  [ -f "$log" ] && grep -v '^PROGRESS \|^RESULT \|^TRANSFER ' "$log" \
    > "$log.tmp" && mv "$log.tmp" "$log"
done
grep -h "resumed\|weights of\|time limit\|tested at\|Error" \
  "$out"/train_*.log "$out"/test_*.log
cat "$out"/mqar_runs_*.jsonl > "$out/mqar_runs.jsonl" 2>/dev/null
cat "$out"/mqar_runs_*.jsonl.transfer > "$out/mqar_transfer.jsonl" 2>/dev/null
cat "$out"/mqar_runs_*.jsonl.progress 2>/dev/null |
  gzip > "$out/mqar_progress.jsonl.gz"
rm -f "$out"/mqar_runs_*.jsonl*
# A round returns about 10 MB: finished checkpoints keep their best run.
# shellcheck disable=SC2046
python3 benchmarks/mqar_keep.py --results "$out/mqar_runs.jsonl" \
  --keep "${MQAR_KEEP:-1}" --budget-mb "${MQAR_BUDGET_MB:-3}" \
  $(cat "$out/resume/labels.txt")
python3 benchmarks/mqar.py --report "$out/mqar_runs.jsonl" \
  --table "$out/mqar_table.md"
du -sh "$out"
echo "mqar job done at ${SECONDS}s"
