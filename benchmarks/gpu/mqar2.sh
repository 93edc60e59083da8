#!/usr/bin/env bash
# MQAR on a second GPU (rounds s4r2 and s4r3): more seeds of the
# equal-state comparison of benchmarks/gpu/mqar.sh. Round 2 (commit
# 60f39b5): seeds 4 and 5 of NHA, GSA, the window and the hybrid on the same
# 8000-step schedule, and full attention on seeds 0 and 1 with 75 warmup
# steps (1.00 everywhere; with round 1's 300, same initialisation and
# batches: 0.57 at 8 pairs). Round 3: seeds 4 and 5 again with 75 warmup
# steps (paired with round 2), the hybrid also at 3e-3, and GSA at 64 tokens
# per layer. $JOB_OUT is the output folder, $JOB_LIMIT_S the seconds before
# the job is killed.
set -u
limit=${JOB_LIMIT_S:-470}
MQAR_DEADLINE=${MQAR_DEADLINE:-$((limit - 30))} \
MQAR_SETTINGS=${MQAR2_SETTINGS:-"nha-M16-W16:chunked:3e-3:16:8000:4,5:75
  gsa-M32:chunked:3e-3:16:8000:4,5:75 swa-W32:chunked:1e-3:16:8000:4,5:75
  hybrid-M32:chunked:1e-3,3e-3:16:8000:4,5:75
  gsa-M64:chunked:3e-3:16:8000:2,3:75"} \
  bash benchmarks/gpu/mqar.sh
