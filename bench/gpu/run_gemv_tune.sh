#!/usr/bin/env bash
# One GPU visit (nvidia-h200, .whl carried) for the fused decode GEMVs: gemv_tune.py (kernel
# checks at 8B shapes, fused vs norm/SiLU kernel + cuBLAS at batch 1-8, launch-shape sweep;
# ~2 min), writing $OUT/gemv_tune.{json,log}. (The engine A/B of 2026-12-01, bench/results/
# 2026-12-01b-h200/gemv, ran the model's fused wiring, since taken out.)
set -uo pipefail
source bench/gpu/wheels.sh
export TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader || true
timeout ${TUNE_TIMEOUT:-200} python3 bench/gpu/gemv_tune.py "$@" 2>&1 | tee $OUT/gemv_tune.log | tail -n 70
