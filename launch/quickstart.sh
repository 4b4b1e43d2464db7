#!/usr/bin/env bash
# The main job on the built-in tiny default: teach the shipped toy base a concept it never saw
# ("zorp", a 5-point star) from 8 images with D-OPSD, through the project's real path, on CPU:
# pairs -> make-shards -> cache-features -> precheck -> dopsd train -> sample -> eval + before/after report.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
OUT=runs/toyworld
BASE=dopsd_scale/toyworld/assets/base
rm -rf "$OUT"   # a fresh run each time
dopsd toyworld make-data --out "$OUT"                      # 8 star images -> image shards -> feature shards
dopsd precheck --model "$BASE" --data "$OUT/features" --out "$OUT/precheck"   # is the teacher better? (GOOD)
dopsd train --config launch/configs/toyworld.yaml "$@"     # 200 D-OPSD steps, EMA teacher
dopsd sample --model "$OUT/dopsd/export" --out "$OUT/dopsd/samples" \
  --prompt "a cyan zorp on a gray background" --prompt "a pink zorp on a black background" \
  --prompt "a red circle on a white background"
dopsd eval --base "$BASE" --tuned dopsd="$OUT/dopsd/export" --concept-prompts "$OUT/concept_prompts.txt" \
  --general-prompts "$OUT/general_prompts.txt" --targets "$OUT/pairs" --seeds 0,1,2 --out "$OUT/eval"
dopsd toyworld compare --tuned "$OUT/dopsd/export" --out "$OUT/report"
echo "done: $OUT/report/before_after_concept.png and summary.md (the three headline numbers, base vs tuned),"
echo "      $OUT/eval/report.html, $OUT/precheck/precheck_grid.png, and the run in $OUT/dopsd"
