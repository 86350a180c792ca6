#!/usr/bin/env bash
# One GPU visit (nvidia-h200, .whl carried) for the engine-speed numbers: kernel checks at
# 8B shapes, tiny model GPU == CPU (graphs and eager), 8B prefill/decode against the
# roofline and the matmul rate, profiler top kernels, and the transformers baseline.
# Extra arguments go to engine_smoke.py (e.g. --hf-baseline "" for a quicker look).
set -uo pipefail
source bench/gpu/wheels.sh
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader || true
timeout ${SMOKE_TIMEOUT:-480} python3 bench/gpu/engine_smoke.py --device cuda:0 "$@" 2>&1 | grep -v "NIXL INFO" \
  | tee ${OUT:-.}/engine_smoke.log | tail -n 60
