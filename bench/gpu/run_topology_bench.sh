#!/usr/bin/env bash
# 1P1D vs two colocated replicas on two GPUs (ARCHITECTURE.md §4: 1P1D should win goodput
# on prefill-heavy traffic). Run from the repository root on the 2-GPU machine, with the
# wheels from ../shared/gpu/fetch-wheels.sh carried in .whl/ (no pip install -e there).
#
#   bash bench/gpu/run_topology_bench.sh [extra pdcluster bench options]
#
# Environment knobs: TOPOLOGIES (default 1P1D,colocated2; one per call fits the device's
# 10-minute limit better: then `python3 -m bench.cli --compare A/summary.json B/summary.json`),
# WORKLOAD (default random-uniform; sharegpt ignores the lengths), RATES (Poisson sweep,
# default 2,4,8,16), NUM_REQUESTS per rate
# (default 120), INPUT_LEN / OUTPUT_LEN (default 2048 / 128), TTFT_SLO_MS / TPOT_SLO_MS
# (default 1000 / 50), CLUSTER_YAML (default bench/gpu/llama8b-2gpu.yaml; llama8b-4gpu.yaml on
# four GPUs), MODEL_DIR (must match the yaml's model.path).
# Results: $OUT/topology-bench-<topologies, _ between>/ (report.md, summary.json, *.png, node logs in logs/).
set -uo pipefail
source bench/gpu/wheels.sh
MODEL_DIR=${MODEL_DIR:-/tmp/pdcluster-llama-3-8b}
TOPOLOGIES=${TOPOLOGIES:-1P1D,colocated2}
NAME=${TOPOLOGIES//,/_}
DEST=${OUT:-bench-out}/topology-bench-${NAME//@/-}${TAG:+-$TAG}  # no '@': such paths do not come back from the device
nvidia-smi --query-gpu=index,name,memory.total --format=csv || true
[ -f "$MODEL_DIR/config.json" ] || python3 -m cluster.cli make-model "$MODEL_DIR" --preset llama-3-8b --no-weights || exit
# cluster/cli.py's bench takes the harness's extra options once it calls
# bench.cli.add_bench_arguments; until then bench.cli is the same command with all of them.
if python3 -m cluster.cli bench --help 2>/dev/null | grep -q -- '--tpot-slo-ms'; then
  BENCH=(python3 -m cluster.cli bench)
else
  BENCH=(python3 -m bench.cli)
fi
PYTHONUNBUFFERED=1 "${BENCH[@]}" "${CLUSTER_YAML:-bench/gpu/llama8b-2gpu.yaml}" --topologies "$TOPOLOGIES" \
  --workload "${WORKLOAD:-random-uniform}" --input-len "${INPUT_LEN:-2048}" --output-len "${OUTPUT_LEN:-128}" \
  --num-requests "${NUM_REQUESTS:-120}" --request-rates "${RATES:-2,4,8,16}" \
  --ttft-slo-ms "${TTFT_SLO_MS:-1000}" --tpot-slo-ms "${TPOT_SLO_MS:-50}" \
  --warmup-requests 8 --max-duration-s 240 --start-timeout-s 300 --out "$DEST" "$@"
