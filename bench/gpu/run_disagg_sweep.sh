#!/usr/bin/env bash
# Issue 14's comparison on nvidia-h200-x2, one workload per device call (each fits the
# 10-minute limit): 1P1D, colocated2 and colocated2 with conditional disaggregation, a rate
# sweep from light load to past the weakest topology's saturation, the same SLOs
# (TTFT <= 1 s, TPOT <= 30 ms) on every workload.
#
#   bash bench/gpu/run_disagg_sweep.sh prefill-heavy | decode-heavy | sharegpt
#
# On four GPUs (issue 13), two calls per workload fit the limit, e.g.
#   CLUSTER_YAML=bench/gpu/llama8b-4gpu.yaml TOPOLOGIES=1P3D,2P2D,3P1D bash bench/gpu/run_disagg_sweep.sh decode-heavy
#   CLUSTER_YAML=bench/gpu/llama8b-4gpu.yaml TOPOLOGIES=colocated4,1P1D bash bench/gpu/run_disagg_sweep.sh decode-heavy
# (1P1D takes the first two GPUs: the 2P2D/1P1D scaling ratio), then --compare the summaries.
#
# Results: $OUT/topology-bench-1P1D_colocated2_colocated2-conditional-<workload>/
# (report.md with the advisor's line, summary.json, plots). Then, on the way home:
#   python3 -m bench.cli --compare OUT/*/summary.json
#   python3 -m bench.cli --compare OUT/*/summary.json --tpot-slo-ms 10   # the same runs at a tighter TPOT
# Tar the results before the call ends (tar czf $OUT/results.tgz -C $OUT topology-bench-*):
# only a few files come back from a device call, and none whose path has '@'.
set -uo pipefail
case ${1:-} in
  prefill-heavy) export WORKLOAD=random-uniform INPUT_LEN=4096 OUTPUT_LEN=128 RATES=${RATES:-4,8,12,16} ;;
  decode-heavy)  export WORKLOAD=random-uniform INPUT_LEN=1024 OUTPUT_LEN=256 RATES=${RATES:-8,16,32,48} ;;
  sharegpt)      export WORKLOAD=sharegpt RATES=${RATES:-8,16,32,64} ;;
  *) echo "usage: $0 prefill-heavy | decode-heavy | sharegpt" >&2; exit 2 ;;
esac
export TOPOLOGIES=${TOPOLOGIES:-1P1D,colocated2,colocated2@conditional} TAG=$1
export NUM_REQUESTS=${NUM_REQUESTS:-160} TTFT_SLO_MS=1000 TPOT_SLO_MS=30
exec bash "$(dirname "$0")/run_topology_bench.sh" --max-duration-s "${MAX_DURATION_S:-25}" --warmup-requests 4 \
  --start-timeout-s 120 "${@:2}"
