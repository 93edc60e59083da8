#!/usr/bin/env bash
# Runs every GPU job of this folder in one device call, two GPUs in parallel.
#
# Each job is `benchmarks/gpu/<name>.sh`, run from the repository root with
# CUDA_VISIBLE_DEVICES set, its output folder in $JOB_OUT and keras, keras-hub,
# fla-core and this package importable. Everything comes back as one archive,
# $OUT/round.tgz (the device tool returns at most 8 files).
#
#   bash benchmarks/gpu/run_round.sh            # on a 2-GPU machine
#   ONE_GPU=1 bash benchmarks/gpu/run_round.sh  # everything on GPU 0
#   SKIP="lm_study mqar" bash benchmarks/gpu/run_round.sh  # leave jobs out
#   FINAL=1 bash benchmarks/gpu/run_round.sh  # only the *_final.sh checks
#   FOUR_GPUS=1 bash benchmarks/gpu/run_round.sh  # a job per GPU, mqar2 too
#   FINAL=1 FOUR_GPUS=1 ONE_GPU=1 ...  # all four final jobs sharing GPU 0
#   FINAL=1 SERIAL=1 ...  # the two final checks one after the other on GPU 0
#
# Each job also gets $JOB_LIMIT_S, the seconds it has before it is killed.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
results=/tmp/round  # outside $OUT: only the archive comes back
mkdir -p "$results"
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl &&
  python3 -m pip install -q --no-deps --no-build-isolation --no-index \
    --target /tmp/nha .
} > "$results/install.log" 2>&1 || { cat "$results/install.log"; exit 1; }
export PYTHONPATH=/tmp/nha:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv > "$results/gpus.txt"

run_job() {  # name gpus seconds
  local name=$1 gpus=$2 limit=$3
  [ -f "benchmarks/gpu/$name.sh" ] || return 0
  case " ${SKIP:-} " in *" $name "*) return 0 ;; esac
  mkdir -p "$results/$name"
  local start=$SECONDS
  CUDA_VISIBLE_DEVICES=$gpus JOB_OUT=$results/$name JOB_LIMIT_S=$limit \
    timeout -k 10 "$limit" bash "benchmarks/gpu/$name.sh" \
    > "$results/$name/log.txt" 2>&1
  echo "$name rc=$? $((SECONDS - start))s gpus=$gpus" | tee -a "$results/summary.txt"
}

if [ -n "${FINAL:-}" ] && [ -n "${SERIAL:-}" ]; then
  run_job triton_final 0 "${FINAL_S:-170}"; run_job pallas_final 0 "${FINAL_S:-170}"
elif [ -n "${FINAL:-}" ]; then  # the kernels' final GPU checks, side by side
  # ONE_GPU=1 shares GPU 0 between them (and the recall jobs, if asked).
  gpu() { if [ -n "${ONE_GPU:-}" ]; then echo 0; else echo "$1"; fi; }
  run_job triton_final "$(gpu 0)" "${FINAL_S:-170}" &
  run_job pallas_final "$(gpu 1)" "${FINAL_S:-170}" &
  if [ -n "${FOUR_GPUS:-}" ]; then  # and the recall study beside them
    run_job mqar "$(gpu 2)" "${MQAR_S:-280}" &
    run_job mqar2 "$(gpu 3)" "${MQAR_S:-280}" &
  fi
  wait
elif [ -n "${FOUR_GPUS:-}" ]; then
  run_job triton 0 "${TRITON_S:-220}" &
  run_job pallas 1 "${PALLAS_S:-220}" &
  run_job mqar 2 "${MQAR_S:-280}" &
  run_job mqar2 3 "${MQAR_S:-280}" &
  wait
elif [ -n "${ONE_GPU:-}" ]; then
  run_job triton 0 "${TRITON_S:-200}"; run_job pallas 0 "${PALLAS_S:-170}"
  run_job mqar 0 "${MQAR_S:-240}"; run_job lm_study 0 "${LM_S:-120}"
else
  ( run_job triton 0 "${TRITON_S:-220}"; run_job pallas 0 "${PALLAS_S:-190}" ) &
  ( run_job mqar 1 "${MQAR_S:-280}"; run_job lm_study 1 "${LM_S:-130}" ) &
  wait
  run_job distributed 0,1 "${DIST_S:-120}"
fi
tar czf "${OUT:-/tmp/out}/round.tgz" -C "$results" .
cat "$results/summary.txt"
