#!/usr/bin/env bash
# Submit training or feature caching to a Ray cluster and stream its logs.
#
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh train launch/configs/X.yaml [key=value ...]
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh cache --input ... --output ... [cache-features flags]
#
# Stop a job with `ray job stop JOB_ID`: the trainer saves a checkpoint first, and the same
# command resumes from it. SUBMISSION_ID=name sets the job id; NO_WAIT=1 returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: launch/submit.sh train|cache ARGS...}
shift
case "$mode" in
  train) entry=(python launch/ray_train.py --config "$@") ;;
  cache) entry=(python -m dopsd_scale.cli cache-features "$@") ;;
  *) echo "launch/submit.sh: unknown mode '$mode' (train or cache)" >&2; exit 2 ;;
esac
args=(--address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --runtime-env launch/ray_runtime_env.yaml)
[ -n "${SUBMISSION_ID:-}" ] && args+=(--submission-id "$SUBMISSION_ID")
[ -n "${NO_WAIT:-}" ] && args+=(--no-wait)
exec ray job submit "${args[@]}" -- "${entry[@]}"
