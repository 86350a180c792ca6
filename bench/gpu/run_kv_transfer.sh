#!/usr/bin/env bash
# KV transfer benchmark on the GPU machine (two GPUs, device kind nvidia-h200-x2): NIXL READ
# cuda:0 -> cuda:1, every variant of bench/gpu/kv_transfer_bench.py (about 1.5 minutes), vs
# torch's peer copy. Run from the repository root with the wheels from
# ../shared/gpu/fetch-wheels.sh carried in .whl/. Extra arguments go to the bench, e.g.
#   bash bench/gpu/run_kv_transfer.sh --variants default k4:threads=8,split=1,chunk=32,k=4
set -uo pipefail
source bench/gpu/wheels.sh
nvidia-smi topo -m || true
PYTHONUNBUFFERED=1 python3 bench/gpu/kv_transfer_bench.py "$@"
