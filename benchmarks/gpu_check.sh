#!/usr/bin/env bash
# The GPU check of impl="pallas" as ONE run that ends within 8 minutes (a device call may last 10; the session
# has 15 in all, start-up included). From the repo root, on the GPU machine:
#
#   bash benchmarks/gpu_check.sh                 # writes everything under $OUT (else benchmarks/results/gpu)
#   bash benchmarks/gpu_check.sh --dry-run       # on a CPU: the same steps at a tiny size, Pallas in interpret mode
#
# 1. correctness (at most 120 s): tests/test_kernels.py's pallas cases (every cell: lstm, vanilla, cifg, fgr,
#    the ablations, gru in both forms, mgu, rnn; forward, gradients, lengths, reverse; float32) and
#    tests/test_pallas.py (whole-H and split schedules, bf16, populations), compiled by Triton, one line per
#    test in the log as it goes;
# 2. speed (until 7 min): benchmarks/layer_speed.py at the six GPU anchors, float32 (TF32 allowed:
#    --matmul-precision default) and bfloat16, lstm and gru with scan_vjp and pallas against torch's cuDNN
#    (torch on the GPU), jax.experimental.rnn and Flax; medians of 20 synchronised runs; the JSON is rewritten
#    after every (shape, dtype) group and groups that no longer fit are skipped (listed in the JSON). Each
#    candidate costs ~4.5 s of compilation: on the H200 (session 10) 15 candidates per group fitted only two
#    anchors in 280 s, hence two cells and two impls here;
# 3. if time is left: the presets vanilla, cifg, FGR and MGU with pallas at two anchors;
# each speed part ends with the AUTO_IMPL lines its rows support.
# Every part checks the elapsed time first and runs under `timeout`, so the script ends by 8 minutes whatever
# happens. Needs jax with CUDA, flax, optax, torch; not optuna (the layer never imports it). lstm_lab runs
# from the checkout (PYTHONPATH): nothing is installed.
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log="$out/gpu_check.log"
LIMIT=${GPU_CHECK_LIMIT:-480}   # seconds for the whole script
SECONDS=0
say() { echo "[gpu_check ${SECONDS}s] $*" | tee -a "$log"; }
left() { echo $((LIMIT - SECONDS)); }

if [ $dry = 1 ]; then
  # tiny and on the CPU: the steps and their arguments, not the numbers
  tests_k="pallas and (lstm or gru) and float32"
  speed_args=(--shapes 6x4x16 --dtypes float32 --repeats 2 --skip torch,flax,cudnn)
  extra_args=(--shapes 6x4x16 --dtypes float32 --repeats 2 --skip torch,flax,cudnn)
else
  tests_k="pallas"
  speed_args=(--dtypes float32,bfloat16 --repeats 20)
  extra_args=(--shapes 128x64x512,1000x1x128 --dtypes float32,bfloat16 --repeats 20 --skip flax,cudnn)
fi

: > "$log"
say "start (limit ${LIMIT}s, dry run: $dry)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>/dev/null \
    || echo "no torch"; } 2>&1 | tee -a "$log"

# 1. correctness
budget=$(( $(left) - 300 )); [ $budget -gt 120 ] && budget=120
if [ $budget -ge 30 ]; then
  say "1. correctness: pytest (timeout ${budget}s)"
  timeout --signal=INT --kill-after=10 $budget python3 -m pytest -v -p no:cacheprovider -o addopts="" \
    tests/test_kernels.py tests/test_pallas.py -m "not integration or slow" -k "$tests_k" 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|error|Error" | tee -a "$log"
  say "1. correctness: done (exit ${PIPESTATUS[0]}; 124 or 130: stopped by its time limit)"
else
  say "1. correctness: skipped (${budget}s left for it)"
fi

# One layer_speed run: NAME, seconds to keep for what follows, the least worth starting, seconds of margin between
# its --deadline and its timeout, then layer_speed's arguments (--out and --deadline added here)
speed_part() {
  local name=$1 reserve=$2 least=$3 margin=$4; shift 4
  local budget=$(( $(left) - reserve ))
  if [ $budget -lt $least ]; then say "$name: skipped (${budget}s left for it)"; return; fi
  say "$name: layer_speed (deadline $((budget - margin))s, timeout ${budget}s)"
  timeout --signal=INT --kill-after=10 $budget python3 benchmarks/layer_speed.py "$@" \
    --deadline $((budget - margin)) --markdown --out "$out/layer_speed_gpu${name#speed}.json" 2>&1 | tee -a "$log"
  say "$name: done (exit ${PIPESTATUS[0]})"
}

# 2. speed at the anchors; 3. FGR and MGU at two of them, if time is left
speed_part speed 45 60 40 --impls scan_vjp,pallas --cells lstm,gru "${speed_args[@]}"
speed_part speed_presets 15 45 30 --impls pallas --cells vanilla,cifg,fgr,mgu "${extra_args[@]}"
say "end; files: $(ls "$out" | tr '\n' ' ')"
