#!/usr/bin/env bash
# One GPU visit (nvidia-h200, .whl carried) for the decode-step experiments of issue 8:
# the fused decode attention's checks and timings against the unfused launches
# (bench/gpu/fused_decode_tune.py), then whole-engine A/B runs of engine_smoke.py in fresh
# processes, in the order MODES gives (alternate them: the machine drifts), then (SWEEP=1)
# the fused kernel's launch-shape sweep.
#   MODES="fused unfused prefetch16 fused unfused prefetch16" bash bench/gpu/run_fused_decode.sh
# Modes: fused (default engine), unfused (PDCLUSTER_FUSED_DECODE=0), prefetchN (o_proj's
# weight prefetched into L2 during attention at batch <= N: PDCLUSTER_L2_PREFETCH_MAX_ROWS=N).
# Results: $OUT/fused_decode_tune.json, $OUT/ab-<i>-<mode>/engine_smoke.{json,log}.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1 PDCLUSTER_CACHE=/tmp/pdcluster-cache
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader || true
[ -n "${SKIP_TUNE:-}" ] || timeout 180 python3 bench/gpu/fused_decode_tune.py 2>&1 | tee "$OUT/fused_decode_tune.log"
SMOKE=(--no-profile --hf-baseline "" --batch-sizes "${BATCH_SIZES:-1,16,64,256}")
i=0
for mode in ${MODES:-fused unfused fused unfused}; do
  i=$((i + 1)); dir="$OUT/ab-$i-$mode"; mkdir -p "$dir"
  case $mode in
    fused) envs=(PDCLUSTER_FUSED_DECODE=1) ;;
    unfused) envs=(PDCLUSTER_FUSED_DECODE=0) ;;
    prefetch*) envs=(PDCLUSTER_FUSED_DECODE=1 PDCLUSTER_L2_PREFETCH_MAX_ROWS=${mode#prefetch}) ;;
    *) echo "unknown mode $mode"; continue ;;
  esac
  extra=(--skip-checks); [ $i = 1 ] && extra=()  # the first run checks the kernels and the tiny model
  env "${envs[@]}" OUT="$dir" timeout 170 python3 bench/gpu/engine_smoke.py --device cuda:0 \
    "${SMOKE[@]}" "${extra[@]}" 2>&1 | grep -v "NIXL INFO" > "$dir/engine_smoke.log"
  echo "== $i $mode"; grep -E "^(decode|prefill|tiny|kernel_rel|NVIDIA|engine start)" "$dir/engine_smoke.log"
done
[ -n "${SWEEP:-}" ] && timeout 240 python3 bench/gpu/fused_decode_tune.py --sweep 2>&1 | tail -n 8 | tee "$OUT/fused_decode_sweep.log"
true
