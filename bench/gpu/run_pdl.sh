#!/usr/bin/env bash
# Programmatic dependent launch and the decode GEMV on one GPU (.whl carried), one visit:
# PDL on == off bit for bit (bench/gpu/pdl_check.py), then a whole-engine A/B of the
# variants given (bench/gpu/ab_engine.sh, decode only), e.g.
#
#   ROUNDS=2 bash bench/gpu/run_pdl.sh "default:" "cublas:PDCLUSTER_PDL=0 PDCLUSTER_TRITON_GEMV="
#
# PDL_CHECK_GEMV picks the GEMV setting the bit-for-bit check runs with (default: the
# engine's); PDL_CHECK=0 skips it.
set -uo pipefail
source bench/gpu/wheels.sh
export OUT=${OUT:-bench-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
if [ "${PDL_CHECK:-1}" = 1 ]; then
  timeout 240 python3 bench/gpu/pdl_check.py --presets "${PDL_CHECK_PRESETS:-tiny:float32,llama-3-8b:bfloat16}" \
    ${PDL_CHECK_GEMV:+--gemv "$PDL_CHECK_GEMV"} 2>&1 | grep -v "NIXL INFO" | tee "$OUT/pdl_check.log" | tail -5
fi
SMOKE_ARGS=${SMOKE_ARGS:---prefill=} bash bench/gpu/ab_engine.sh "$@"
