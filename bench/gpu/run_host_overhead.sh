#!/usr/bin/env bash
# One GPU visit for what the host side and the sampler cost per decode step:
#   1. the CUDA-only sampler checks (no host sync while the forward runs; the Triton draw
#      against the torch reference on the GPU),
#   2. the sampler's device time per rule (sampler_cost.py),
#   3. a node's serving loop against the engine alone (node_overhead.py),
#   4. sampled and structured-output decode steps against greedy (structured_output_overhead.py:
#      needs xgrammar and llguidance among the carried wheels).
#
#   bash ../shared/gpu/fetch-wheels.sh xgrammar apache-tvm-ffi   # on your machine, then llguidance>=1.9:
#   pip download --no-deps --only-binary=:all: -d .whl "llguidance>=1.9"  (manylinux_2_31, abi3)
#   bash bench/gpu/run_host_overhead.sh                                      # there, carry .whl
set -uo pipefail
source bench/gpu/wheels.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
python3 -m pytest -q -p no:cacheprovider tests/test_sampler.py tests/test_kernels_sampling.py 2>&1 \
  | grep -v "nanobind\|leaked" | tail -25 | tee "$OUT/cuda_tests.log"
timeout "${COST_TIMEOUT:-200}" python3 bench/gpu/sampler_cost.py 2>&1 | grep -v "nanobind\|leaked" \
  | tee "$OUT/sampler_cost.log" | grep -E "^batch|race kernel"
timeout "${NODE_TIMEOUT:-300}" python3 bench/gpu/node_overhead.py --batch-sizes "${NODE_BATCHES:-16,64,128}" \
  2>&1 | grep -v "nanobind\|leaked" | tee "$OUT/node_overhead.log" | tail -5
timeout "${SO_TIMEOUT:-300}" python3 bench/gpu/structured_output_overhead.py --batch-sizes "${SO_BATCHES:-16,64}" \
  2>&1 | grep -v "nanobind\|leaked" | tee "$OUT/structured_output_overhead.log" | grep "^batch"
