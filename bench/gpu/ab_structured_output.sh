#!/usr/bin/env bash
# Structured-output and sampling overhead (structured_output_overhead.py), this tree against
# an earlier one, alternated ROUNDS times in one visit: the host's speed differs between
# machines by up to 2x (bench/results/2026-12-02-h200), and these overheads are host time.
#
#   rm -rf bench-out/old_tree && mkdir -p bench-out/old_tree && git archive COMMIT | tar x -C bench-out/old_tree
#   OUT=... bash bench/gpu/ab_structured_output.sh          # there; carry .whl and bench-out/old_tree
#
# SO_BATCHES (default 64), BACKENDS (default xgrammar,guidance). Results:
# $OUT/ab-<round>-<new|old>/structured_output_overhead.{json,log}.
set -uo pipefail
source bench/gpu/wheels.sh
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
for round in $(seq "${ROUNDS:-2}"); do
  for label in new old; do
    tree=$PWD; [ "$label" = old ] && tree=$PWD/${OLD_TREE:-bench-out/old_tree}
    dir="$OUT/ab-$round-$label"; mkdir -p "$dir"
    (cd "$tree" && PYTHONPATH=/tmp/site:$tree OUT="$dir" timeout "${SO_TIMEOUT:-200}" python3 \
      bench/gpu/structured_output_overhead.py --batch-sizes "${SO_BATCHES:-64}" --backends "${BACKENDS:-xgrammar,guidance}" \
      2>&1 | grep -v "nanobind\|leaked" > "$dir/structured_output_overhead.log")
    echo "== round $round $label"; grep -E "^batch" "$dir/structured_output_overhead.log"
  done
done
