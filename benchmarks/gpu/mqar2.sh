#!/usr/bin/env bash
# MQAR on a second GPU: benchmarks/gpu/mqar.sh's sweep at T = 1024 (pairs 32
# to 256; vocabulary 1024 as at T = 512), the five settings at their
# literal sizes, seeds 0 and 1, trained over all three rounds (planned,
# checkpointed, resumed and planned again: mqar.sh). Tests every 500 steps,
# log lines (and time-limit checks) every 50. Round 2 (commit c40134c) added
# the T = 256 lever of mqar.sh on seeds 10-13, with and without the window
# closed for the first 3000 steps; the final round runs the sweep alone.
# Session 4's job (more seeds at T = 256): this file at 02d975b.
# $JOB_OUT is the output folder, $JOB_LIMIT_S the seconds before the kill.
set -u
limit=${JOB_LIMIT_S:-470}
t256=--seq-len,256,--vocab,512,--pairs,8,16,32,64
MQAR_DEADLINE=${MQAR_DEADLINE:-$((limit - 30))} \
MQAR_SEQ_LEN=${MQAR2_SEQ_LEN:-1024} MQAR_PAIRS=${MQAR2_PAIRS:-"32 64 128 256"} \
MQAR_SETTINGS=${MQAR2_SETTINGS:-"nha-M64-W64:chunked:3e-3:16:-:0,1:75
  gsa-M64:chunked:3e-3:16:-:0,1:75 swa-W64:chunked:1e-3:16:-:0,1:75
  full:chunked:3e-3:16:-:0,1:75 hybrid-M64:chunked:1e-3:16:-:0,1:75"} \
MQAR_LOG_EVERY=${MQAR_LOG_EVERY:-50} \
  bash benchmarks/gpu/mqar.sh
