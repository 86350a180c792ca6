#!/usr/bin/env bash
# One GPU visit for what the host side costs per decode step: a node's serving loop against
# the engine alone (node_overhead.py) and structured output at batch 64
# (structured_output_overhead.py: needs xgrammar and llguidance among the carried wheels).
#
#   bash ../shared/gpu/fetch-wheels.sh xgrammar apache-tvm-ffi   # on your machine, then llguidance>=1.9:
#   pip download --no-deps --only-binary=:all: -d .whl "llguidance>=1.9"  (manylinux_2_31, abi3)
#   bash bench/gpu/run_host_overhead.sh                                      # there, carry .whl
set -uo pipefail
source bench/gpu/wheels.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
timeout "${NODE_TIMEOUT:-300}" python3 bench/gpu/node_overhead.py --batch-sizes "${NODE_BATCHES:-16,64,128}" \
  2>&1 | grep -v "nanobind\|leaked" | tee "$OUT/node_overhead.log"
timeout "${SO_TIMEOUT:-240}" python3 bench/gpu/structured_output_overhead.py --batch-sizes "${SO_BATCHES:-64}" \
  2>&1 | grep -v "nanobind\|leaked" | tee "$OUT/structured_output_overhead.log"
