#!/usr/bin/env bash
# The real-model code path on tiny random-weight models (Z-Image pipeline, Qwen3-VL teacher), on CPU:
# tiny models -> synthetic pairs -> image shards -> feature shards -> D-OPSD training -> sample grid -> export.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=runs
dopsd make-debug-models "$OUT/assets"
dopsd make-synthetic-pairs "$OUT/pairs" --count 48
dopsd make-shards --input "$OUT/pairs" --output "$OUT/images" \
  --buckets 32x32,32x48,48x32 --shard-size 16 --min-side 16
dopsd cache-features --input "$OUT/images" --output "$OUT/features" \
  --pipeline "$OUT/assets/zimage" --teacher-vlm "$OUT/assets/teacher_vlm" \
  --latents --vlm-min-pixels 1024 --vlm-max-pixels 4096
dopsd verify "$OUT/features" --images "$OUT/images"
dopsd train --config launch/configs/debug_zimage.yaml "$@"
dopsd sample --model "$OUT/debug/export" --out "$OUT/debug/samples" --height 32 --width 32 \
  --prompt "a red circle on a blue background" --prompt "a yellow triangle on a black background"
dopsd export --model "$OUT/assets/zimage" --checkpoint "$OUT/debug/checkpoints" --out "$OUT/debug/export_from_checkpoint"
echo "done: run directory $OUT/debug (config.yaml, metrics.jsonl, checkpoints/, validation/, export/, samples/)"
