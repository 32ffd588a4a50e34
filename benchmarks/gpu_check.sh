#!/usr/bin/env bash
# The GPU checks of impl="pallas", each part sized for one device call (< 10 minutes on an H100), from the
# repo root:
#
#   bash benchmarks/gpu_check.sh tests|whole|split [OUTDIR]     # OUTDIR default: $OUT, else benchmarks/results
#
# tests: tests/test_pallas.py on the GPU: the kernels compiled by Triton (not interpret mode) against the
#        scan, float32 matmuls at "highest" precision (the test module pins it), bf16 as in CI.
# whole: benchmarks/layer_speed.py at the GPU anchors, one program per 16 batch rows holding all of H
#        (H <= H_MAX; larger anchors are reported as skipped): scan, scan_vjp, pallas, torch's cuDNN LSTM and
#        jax.experimental.rnn, float32 (TF32 allowed: --matmul-precision default) and bfloat16.
# split: the large-H anchors with H split across programs (block_h 16; block_b so that the programs,
#        which meet at a barrier every step, fit on the 132 SMs at once).
# Needs jax with CUDA, flax, optax, torch; not optuna (the layer never imports it). lstm_lab runs from the
# checkout (PYTHONPATH): nothing is installed.
set -uo pipefail
part=${1:?usage: gpu_check.sh tests|whole|split [OUTDIR]}
out=${2:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log="$out/gpu_check_$part.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } 2>&1 | tee "$log"
speed="python3 benchmarks/layer_speed.py --impls scan,scan_vjp,pallas --dtypes float32,bfloat16 --repeats 20 --markdown"
case $part in
  tests) python3 -m pytest -q -p no:cacheprovider -o addopts="" --durations=5 tests/test_pallas.py 2>&1 | tee -a "$log" ;;
  whole) $speed --cells lstm,vanilla,cifg,fgr,gru --out "$out/layer_speed_gpu_whole.json" 2>&1 | tee -a "$log" ;;
  split) $speed --cells lstm,vanilla,cifg,fgr --skip flax --shapes 128x64x512,128x64x1024 --block-b 64 --block-h 16 \
             --out "$out/layer_speed_gpu_split64.json" 2>&1 | tee -a "$log"
         $speed --cells lstm,vanilla --skip flax --shapes 128x256x1024 --block-b 256 --block-h 16 \
             --out "$out/layer_speed_gpu_split256.json" 2>&1 | tee -a "$log" ;;
  *) echo "unknown part $part: expected tests, whole or split" >&2; exit 2 ;;
esac
