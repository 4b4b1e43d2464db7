"""Wait until a Ray cluster has the expected nodes and GPUs (used by the Slurm scripts).

    python launch/wait_for_ray.py --address HEAD:6379 --nodes 4 --gpus 32 --timeout 600

Prints a progress line every 30 s, so a job log shows where a slow start is stuck.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

import ray

PROGRESS_EVERY_S = 30


def wait_for_port(address: str, deadline: float) -> bool:
    """True once the head's GCS port accepts connections (ray.init alone would retry for long)."""
    host, port = address.rsplit(":", 1)
    while time.time() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return True
        except OSError:
            time.sleep(1)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus", type=float, default=0)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    deadline = time.time() + args.timeout
    if not wait_for_port(args.address, deadline):
        print(
            f"error: after {args.timeout:g}s nothing listens at {args.address}: the Ray head did not come up; "
            "see the ray-head-*.log file of this job",
            file=sys.stderr,
        )
        return 1
    ray.init(address=args.address, logging_level="ERROR")
    next_progress = time.time() + PROGRESS_EVERY_S
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        gpus = ray.cluster_resources().get("GPU", 0)
        state = f"{len(nodes)}/{args.nodes} node(s) and {gpus:g}/{args.gpus:g} GPU(s)"
        if len(nodes) >= args.nodes and gpus >= args.gpus:
            print(f"ray cluster ready: {len(nodes)} node(s), {gpus:g} GPU(s)", flush=True)
            return 0
        if time.time() > deadline:
            print(
                f"error: after {args.timeout:g}s the Ray cluster at {args.address} has {state}; "
                "see the ray-*.log files of this job",
                file=sys.stderr,
            )
            return 1
        if time.time() > next_progress:
            print(f"waiting for the Ray cluster: {state}", flush=True)
            next_progress += PROGRESS_EVERY_S
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
