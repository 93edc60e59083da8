#!/usr/bin/env bash
# Final GPU correctness check of the shipped Triton kernels (FINAL=1
# run_round.sh, one GPU, ~150 s). Seven processes side by side, most
# important check first in each (round s4r1 started 21 processes at once
# and none of them finished in 80 s: compiling is CPU-bound; in s4r2 each
# check took 14-76 s next to seven other processes).
# "issue": 1-2 fp32 padded (MHA and GQA), 3 fp16 M=0 d=96, 4 torch.compile,
# 5 model.fit (mixed bf16); "kernels": 0 bf16 T=16384 GQA, 2 streaming +
# decode with padding, 5 strong gates, 7 W=0; "quick": the benchmark's
# layout (H = Hkv = 16, T=4096).
set -u
export KERAS_BACKEND=torch
out=${JOB_OUT:-/tmp/triton_final}
mkdir -p "$out"
echo "kernels: $(cat kernels/triton/*.py | sha1sum | cut -c1-12)"
limit=${TRITON_FINAL_S:-145}
check() {  # log-name part indices
  timeout "$limit" python3 tests/triton_gpu_check.py --part "$2" \
    --only "$3" > "$out/$1.log" 2>&1
}
check gqa_strong kernels 0,5 &
check fp32_padded issue 1 &
check fp32_padded_gqa issue 2 &
check compile_fit issue 4,5 &
check fp16_swa issue 3 &
check stream_w0 kernels 2,7 &
check bench_layout quick 0 &
wait
grep -h "PASS\|FAIL\|checks passed\|losses" "$out"/*.log
for log in "$out"/*.log; do
  grep -q "checks passed" "$log" ||
    echo "$(basename "$log" .log): did not finish (timed out or crashed)"
done
echo "final check done at ${SECONDS}s"
