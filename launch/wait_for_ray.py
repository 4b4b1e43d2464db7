"""Wait until a Ray cluster has the expected nodes and GPUs (used by the Slurm scripts).

    python launch/wait_for_ray.py --address HEAD:6379 --nodes 4 --gpus 32 --timeout 600
"""

from __future__ import annotations

import argparse
import sys
import time

import ray


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus", type=float, default=0)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    ray.init(address=args.address, logging_level="ERROR")
    deadline = time.time() + args.timeout
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        gpus = ray.cluster_resources().get("GPU", 0)
        if len(nodes) >= args.nodes and gpus >= args.gpus:
            print(f"ray cluster ready: {len(nodes)} node(s), {gpus:g} GPU(s)")
            return 0
        if time.time() > deadline:
            print(f"error: after {args.timeout:g}s the Ray cluster at {args.address} has {len(nodes)}/{args.nodes} "
                  f"node(s) and {gpus:g}/{args.gpus:g} GPU(s); see the ray-*.log files of this job", file=sys.stderr)
            return 1
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
