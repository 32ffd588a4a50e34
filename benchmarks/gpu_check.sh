#!/usr/bin/env bash
# The GPU checks of impl="pallas", each part meant to fit one device call (10 minutes; not yet run on a GPU,
# so the sizes are estimates), from the repo root:
#
#   bash benchmarks/gpu_check.sh tests|speed|fgr|split16 [OUTDIR]   # OUTDIR default: $OUT, else benchmarks/results
#
# tests:   tests/test_pallas.py and the pallas cases of tests/test_kernels.py on the GPU: the kernels compiled
#          by Triton (not interpret mode) against the scan and the float64 reference, float32 matmuls at "highest"
#          precision (the test modules pin it), bf16 as in CI.
# speed:   benchmarks/layer_speed.py at the six GPU anchors with the kernel's own plan (whole H in one program
#          where the weights fit, else H split across programs): scan, scan_vjp, pallas, torch's cuDNN LSTM/GRU
#          (and tanh RNN) and jax.experimental.rnn, float32 (TF32 allowed: --matmul-precision default) and bfloat16.
# fgr:     the same for FGR (its split kernel unrolls 13 weight matrices per chunk: slow to compile at H=1024).
# split16: the large-H anchors with 16 hidden columns per program set by hand, to compare with the plan.
# Needs jax with CUDA, flax, optax, torch; not optuna (the layer never imports it). lstm_lab runs from the
# checkout (PYTHONPATH): nothing is installed.
set -uo pipefail
part=${1:?usage: gpu_check.sh tests|speed|fgr|split16 [OUTDIR]}
out=${2:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log="$out/gpu_check_$part.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } 2>&1 | tee "$log"
speed="python3 benchmarks/layer_speed.py --impls scan,scan_vjp,pallas --dtypes float32,bfloat16 --repeats 20 --markdown"
case $part in
  tests) python3 -m pytest -q -p no:cacheprovider -o addopts="" --durations=5 tests/test_pallas.py \
           tests/test_kernels.py -k "pallas and not integration" 2>&1 | tee -a "$log" ;;
  speed) $speed --cells lstm,vanilla,cifg,gru,rnn --out "$out/layer_speed_gpu.json" 2>&1 | tee -a "$log" ;;
  fgr) $speed --cells lstm,fgr --skip flax --out "$out/layer_speed_gpu_fgr.json" 2>&1 | tee -a "$log" ;;
  split16) $speed --cells lstm,vanilla --skip flax --shapes 128x64x512,128x64x1024,128x256x1024 --block-b 64 \
             --block-h 16 --out "$out/layer_speed_gpu_split16.json" 2>&1 | tee -a "$log" ;;
  *) echo "unknown part $part: expected tests, speed, fgr or split16" >&2; exit 2 ;;
esac
