#!/usr/bin/env bash
# MQAR on a second GPU (round s4r2, when the round has four GPUs): more
# seeds of the equal-state comparison of benchmarks/gpu/mqar.sh (seeds 4 and
# 5 of NHA, GSA, the window and the hybrid on the same 8000-step schedule),
# and full attention on seeds 0 and 1 with 75 warmup steps: the same
# initialisation and batches as its round-1 runs (300 warmup steps), so the
# two differ in the warmup only. $JOB_OUT is the output folder, $JOB_LIMIT_S
# the seconds before the job is killed.
set -u
limit=${JOB_LIMIT_S:-470}
MQAR_DEADLINE=${MQAR_DEADLINE:-$((limit - 30))} \
MQAR_SETTINGS=${MQAR2_SETTINGS:-"nha-M16-W16:chunked:3e-3:16:8000:4,5:300
  gsa-M32:chunked:3e-3:16:8000:4,5:300 swa-W32:chunked:1e-3:16:8000:4,5:300
  hybrid-M32:chunked:1e-3:16:8000:4,5:300 full:chunked:3e-3:16:3000:0,1:75"} \
  bash benchmarks/gpu/mqar.sh
