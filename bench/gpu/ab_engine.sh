#!/usr/bin/env bash
# Whole-engine A/B on one GPU (.whl carried): engine_smoke.py in fresh processes, variants
# alternated ROUNDS times in one visit so that each sees the same machine (its copy rate and
# step times drift by a few percent between machines and over minutes).
#
#   ROUNDS=3 bash bench/gpu/ab_engine.sh "new:MY_SWITCH=1" "old:MY_SWITCH=0"
#
# Each argument is "LABEL:VAR=VALUE[ VAR=VALUE...]", environment variables an experiment reads
# (e.g. PDCLUSTER_TRITON_GEMV in commit cd90ff0, bench/results/2026-12-01c-h200). BATCH_SIZES (default 1,16,64) picks the
# decode batches; the first run also checks the kernels and the tiny model (GPU == CPU).
# SMOKE_ARGS adds engine_smoke.py options to every run (e.g. --prefill= to time decode only).
# Results: $OUT/ab-<round>-<label>/engine_smoke.{json,log}; a summary table at the end.
set -uo pipefail
source bench/gpu/wheels.sh
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
first=1
for round in $(seq "${ROUNDS:-2}"); do
  for variant in "$@"; do
    label=${variant%%:*}; read -r -a envs <<< "${variant#*:}"
    dir="$OUT/ab-$round-$label"; mkdir -p "$dir"
    extra=(--skip-checks); [ $first = 1 ] && extra=() && first=0
    env "${envs[@]}" OUT="$dir" timeout 170 python3 bench/gpu/engine_smoke.py --device cuda:0 --no-profile \
      --hf-baseline "" --batch-sizes "${BATCH_SIZES:-1,16,64}" "${extra[@]}" ${SMOKE_ARGS:-} 2>&1 | grep -v "NIXL INFO" > "$dir/engine_smoke.log"
    echo "== round $round $label"; grep -E "^(decode|tiny|kernel_rel|NVIDIA)" "$dir/engine_smoke.log"
  done
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
rows = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "ab-*", "engine_smoke.json"))):
    label = os.path.basename(os.path.dirname(path)).split("-", 2)[2]
    for key, d in json.load(open(path))["engine"]["decode"].items():
        rows.setdefault(key, {}).setdefault(label, []).append(d["step_ms"])
print("decode ms/step, every run (mean)")
for key, by in rows.items():
    print(f"  {key:>10}: " + "; ".join(f"{lab} {' '.join(f'{v:.2f}' for v in vs)} ({sum(vs) / len(vs):.3f})"
                                       for lab, vs in by.items()))
PY
