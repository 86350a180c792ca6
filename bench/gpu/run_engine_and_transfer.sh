#!/usr/bin/env bash
# One GPU visit (nvidia-h200-x2, .whl carried): the engine smoke run on cuda:0, then the
# KV transfer benchmark cuda:0 -> cuda:1. Results under $OUT (engine_smoke.json, kv_*.json).
set -uo pipefail
source bench/gpu/wheels.sh
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv || true
timeout 300 python3 bench/gpu/engine_smoke.py --device cuda:0 2>&1 | grep -v "NIXL INFO" | tee ${OUT:-.}/engine_smoke.log | tail -n 12
timeout 240 python3 bench/gpu/kv_transfer_bench.py 2>&1 | grep -v "NIXL INFO" | tee ${OUT:-.}/kv_transfer.log | tail -n 45
