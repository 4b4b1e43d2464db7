# Ray on a Slurm allocation: sourced by the batch scripts in this folder.
# One `ray start` per node, each in its own `srun` step (--overlap: the steps share the
# allocation with the driver). Node 0 is the head; the others join it.

ray_cluster_start() {
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  HEAD_NODE=${NODES[0]}
  # The head's address as the other nodes reach it (override HEAD_IP for a particular network).
  HEAD_IP=${HEAD_IP:-$(srun --overlap --nodes=1 --ntasks=1 -w "$HEAD_NODE" hostname --ip-address | awk '{print $1}')}
  RAY_ADDRESS_GCS="$HEAD_IP:$RAY_PORT"
  export RAY_ADDRESS="http://$HEAD_IP:$RAY_DASHBOARD_PORT"
  mkdir -p "$LOG_DIR"
  echo "$(date -Is) starting Ray: head $HEAD_NODE ($RAY_ADDRESS_GCS), ${#NODES[@]} node(s), logs in $LOG_DIR"
  local common=(--num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --disable-usage-stats --block)
  [ -n "${OBJECT_STORE_BYTES:-}" ] && common+=(--object-store-memory="$OBJECT_STORE_BYTES")
  srun --overlap --nodes=1 --ntasks=1 -w "$HEAD_NODE" --output="$LOG_DIR/ray-head-$HEAD_NODE.log" \
    ray start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --dashboard-host=0.0.0.0 \
    --dashboard-port="$RAY_DASHBOARD_PORT" "${common[@]}" &
  RAY_STEPS=($!)
  sleep 5  # let the head open its port before the workers dial in
  if ! kill -0 "${RAY_STEPS[0]}" 2>/dev/null; then
    echo "error: the Ray head did not start on $HEAD_NODE; see $LOG_DIR/ray-head-$HEAD_NODE.log" >&2
    return 1
  fi
  for node in "${NODES[@]:1}"; do
    srun --overlap --nodes=1 --ntasks=1 -w "$node" --output="$LOG_DIR/ray-worker-$node.log" \
      ray start --address="$RAY_ADDRESS_GCS" "${common[@]}" &
    RAY_STEPS+=($!)
  done
  python "$REPO/launch/wait_for_ray.py" --address "$RAY_ADDRESS_GCS" --nodes "${#NODES[@]}" \
    --gpus $(( ${#NODES[@]} * GPUS_PER_NODE )) --timeout "$WAIT_TIMEOUT_S"
}

ray_cluster_stop() {
  echo "$(date -Is) stopping Ray on ${#NODES[@]} node(s)"
  for node in "${NODES[@]}"; do
    timeout 120 srun --overlap --nodes=1 --ntasks=1 -w "$node" ray stop --force >/dev/null 2>&1 || true
  done
  kill "${RAY_STEPS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}

# Submit with the job API and wait for a terminal state; waits in `sleep & wait` so that a
# trapped signal (preemption) is handled within a second.
ray_job_run() {
  JOB_ID=$1; shift
  ray job submit --address "$RAY_ADDRESS" --submission-id "$JOB_ID" --no-wait \
    --runtime-env "$REPO/launch/ray_runtime_env.yaml" -- "$@"
  ray job logs --address "$RAY_ADDRESS" --follow "$JOB_ID" &
  local follower=$!
  while :; do
    JOB_STATUS=$(ray job status --address "$RAY_ADDRESS" "$JOB_ID" 2>/dev/null | grep -oiE 'pending|running|succeeded|failed|stopped' | tail -n 1 | tr '[:lower:]' '[:upper:]' || true)
    case "$JOB_STATUS" in SUCCEEDED|FAILED|STOPPED) break ;; esac
    sleep 5 & wait $! || true  # a trapped signal interrupts `wait` with status > 128
  done
  wait "$follower" 2>/dev/null || true
  echo "ray job $JOB_ID: $JOB_STATUS"
}
