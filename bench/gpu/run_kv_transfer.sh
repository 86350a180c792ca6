#!/usr/bin/env bash
# KV transfer benchmark on the GPU machine (two GPUs): NIXL READ cuda:0 -> cuda:1 vs torch
# peer copy. Run from the repository root with the wheels from ../shared/gpu/fetch-wheels.sh
# carried in .whl/. Extra arguments go to the script (e.g. --variants default).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
nvidia-smi topo -m || true
PYTHONUNBUFFERED=1 python3 bench/gpu/kv_transfer_bench.py "$@"
