#!/usr/bin/env bash
# Final GPU check of the shipped Triton kernels (FINAL=1 run_round.sh,
# one GPU, ~170 s): correctness first (~50 s alone on an H200 in s5r4),
# then, with what time is left, the T=4096 eager comparison again (SDPA,
# the public op, the kernels, CUDA graphs; a second measurement of the
# issue's last open target). The checks: seven processes side by side, most
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
limit=${TRITON_FINAL_S:-110}
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
[ -n "${TRITON_FINAL_S:-}" ] && exit 0  # the checks alone (round job)
# The eager comparison: with the defaults, again in the reverse row order
# (rules out an order effect), then without launch plans (their saving).
for run in default reversed no_plans; do
  left=$(( ${JOB_LIMIT_S:-170} - 10 - SECONDS ))
  [ "$left" -gt 25 ] || break
  plans=1; [ "$run" = no_plans ] && plans=0
  reverse=0; [ "$run" = reversed ] && reverse=1
  KERAS_NHA_TRITON_PLANS=$plans NHA_BENCH_EAGER_REVERSED=$reverse \
    timeout "$left" python3 \
    benchmarks/triton_benchmark.py --eager 4096 --lengths "" --peers none \
    --breakdown "" --no-decode --deadline "$left" \
    --json "$out/eager_4096_$run.json" --plot "$out/eager_4096_$run.png" \
    > "$out/eager_4096_$run.log" 2>&1
  echo "== eager T=4096, $run (at ${SECONDS}s)"
  grep "^launch plans\|^\[eager\|^fwd+bwd at\|^row\|^NHA \|^SDPA \|kernels" \
    "$out/eager_4096_$run.log"
done
echo "job done at ${SECONDS}s"
