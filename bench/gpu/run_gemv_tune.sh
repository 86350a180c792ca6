#!/usr/bin/env bash
# One GPU visit (nvidia-h200, .whl carried) for the fused decode GEMVs: gemv_tune.py (kernel
# checks at 8B shapes, fused vs norm/SiLU kernel + cuBLAS at batch 1-8, launch-shape sweep;
# ~2 min), writing $OUT/gemv_tune.{json,log}. With AB=1 it then runs engine_smoke.py twice at
# decode batch 1/2/4/8/16 (no checks, no profile, no transformers baseline): fused GEMVs as
# the engine picks them (PDCLUSTER_FUSED_GEMV=1), then off, into $OUT/engine_smoke_{fused,unfused}.*
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1 PDCLUSTER_CACHE=/tmp/pdcluster-cache TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader || true
timeout ${TUNE_TIMEOUT:-200} python3 bench/gpu/gemv_tune.py "$@" 2>&1 | tee $OUT/gemv_tune.log | tail -n 70
if [ "${AB:-0}" = 1 ]; then
  for mode in fused unfused; do
    export PDCLUSTER_FUSED_GEMV=$([ $mode = fused ] && echo 1 || echo 0)
    timeout ${SMOKE_TIMEOUT:-190} python3 bench/gpu/engine_smoke.py --device cuda:0 --batch-sizes 1,2,4,8,16 \
      --skip-checks --no-profile --hf-baseline "" 2>&1 | grep -v "NIXL INFO" > $OUT/engine_smoke_$mode.log
    [ -f $OUT/engine_smoke.json ] && mv $OUT/engine_smoke.json $OUT/engine_smoke_$mode.json
    echo "== $mode"; grep -E "decode batch|engine start|copy" $OUT/engine_smoke_$mode.log
  done
fi
