#!/usr/bin/env bash
# GPU exactness checks (nvidia-h200-x2, .whl carried): the sampler's CPU/CUDA bit-identity
# test, and a 1P1D cluster over NIXL (VRAM) answering token for token what one offline
# engine answers (bench/gpu/check_disagg_exact.py).
set -uo pipefail
source bench/gpu/wheels.sh
python3 -m pytest -q -p no:cacheprovider tests/test_sampler.py -k cuda 2>&1 | tail -n 3
timeout 400 python3 bench/gpu/check_disagg_exact.py 2>&1 | grep -v "NIXL INFO" | tail -n 12
