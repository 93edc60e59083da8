#!/usr/bin/env bash
# Final GPU correctness check of the shipped Triton kernels (FINAL=1
# run_round.sh, one GPU, ~150 s): one process per check, all in parallel
# (they compile different kernels; compiling is most of the time).
# "issue": 0 auto dispatch, 1-2 fp32 padded (MHA and GQA), 3 fp16 M=0 d=96,
# 4 torch.compile, 5 model.fit (mixed bf16); "kernels": 0 bf16 T=16384 GQA,
# 1 window reads q and k, 2 streaming + decode with padding, 4 M=128 d=64
# GQA 8/2, 5 strong gates, 7 W=0, 8 W >= T; "quick": the benchmark's layout
# (H = Hkv = 16, T=4096).
set -u
export KERAS_BACKEND=torch
out=${JOB_OUT:-/tmp/triton_final}
mkdir -p "$out"
echo "kernels: $(cat kernels/triton/*.py | sha1sum | cut -c1-12)"
limit=${TRITON_FINAL_S:-140}
for only in 0 1 2 3 4 5; do
  timeout "$limit" python3 tests/triton_gpu_check.py --part issue \
    --only $only > "$out/issue_$only.log" 2>&1 &
done
for only in 0 1 2 4 5 7 8; do
  timeout "$limit" python3 tests/triton_gpu_check.py --part kernels \
    --only $only > "$out/kernels_$only.log" 2>&1 &
done
timeout "$limit" python3 tests/triton_gpu_check.py --part quick \
  > "$out/quick.log" 2>&1 &
wait
for log in "$out"/*.log; do
  name=$(basename "$log" .log)
  result=$(grep -h "PASS\|FAIL" "$log" | head -3)
  echo "$name: ${result:-NO RESULT (timed out or crashed: see $name.log)}"
done
grep -h "losses" "$out"/*.log
echo "final check done at ${SECONDS}s"
