#!/usr/bin/env bash
# One GPU visit for what sampling and structured output cost a decode step:
#   1. the CUDA-only sampler checks and both sampling kernels against their references,
#   2. the kernels alone beside the references (sampler_kernels.py: top_p's sort against
#      the search kernels, the race against its elementwise reference),
#   3. the sampler per rule: CUDA-event time, the device's busy time, the host's time
#      (sampler_cost.py),
#   4. sampled and structured-output decode steps against greedy, with GPU busy against
#      wall time per step (structured_output_overhead.py --profile; needs the xgrammar and
#      llguidance wheels: see run_host_overhead.sh),
#   5. 1P1D on one GPU against one engine, token for token (check_disagg_exact.py).
#
#   OUT=... bash bench/gpu/run_sampler_speed.sh        # there, carry .whl
set -uo pipefail
source bench/gpu/wheels.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
python3 -m pytest -q -p no:cacheprovider tests/test_sampler.py tests/test_kernels_sampling.py \
  tests/test_kernels_sampling_filters.py 2>&1 | grep -v "nanobind\|leaked" | tail -5 | tee "$OUT/cuda_tests.log"
timeout "${KERNELS_TIMEOUT:-150}" python3 bench/gpu/sampler_kernels.py 2>&1 | grep -v "nanobind\|leaked" \
  | tee "$OUT/sampler_kernels.log" | grep -E "^batch"
timeout "${COST_TIMEOUT:-150}" python3 bench/gpu/sampler_cost.py 2>&1 | grep -v "nanobind\|leaked" \
  | tee "$OUT/sampler_cost.log" | grep -E "^batch .*ms|race kernel"
timeout "${SO_TIMEOUT:-240}" python3 bench/gpu/structured_output_overhead.py --profile \
  --batch-sizes "${SO_BATCHES:-16,64}" 2>&1 | grep -v "nanobind\|leaked" \
  | tee "$OUT/structured_output_overhead.log" | grep -E "^batch|busy"
[ -n "${SKIP_EXACT:-}" ] || DEVICES=${DEVICES:-cuda:0,cuda:0} timeout "${EXACT_TIMEOUT:-300}" \
  python3 bench/gpu/check_disagg_exact.py 2>&1 | grep -v "NIXL INFO\|nanobind\|leaked" | tail -12 \
  | tee "$OUT/check_disagg_exact.log"
