"""Ray Train driver: `python launch/ray_train.py --config X.yaml [key=value ...]`.

Submit it to a cluster with `ray job submit --working-dir . -- python launch/ray_train.py ...`.
The driver validates the config (a wrong one stops here, before any worker starts), then runs a
TorchTrainer with one worker per GPU (or CPU workers on gloo). Every worker turns the config dict
back into the typed tree and runs the same `Trainer` as torchrun and single-process runs. After a
worker or node dies, Ray restarts the group (FailureConfig) and the workers resume from the
newest complete checkpoint in the run directory (shared storage), or from the checkpoint Ray
hands them (`ray.train.get_checkpoint()`) when the run directory has none.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import ray
import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dopsd_scale.config import Config, ConfigError, config_from_dict, load_config, to_dict
from dopsd_scale.faults import request_stop

log = logging.getLogger("dopsd.ray")


def train_loop_per_worker(config: dict) -> None:
    """What every Ray worker runs: the typed config at once, then the ordinary Trainer."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dopsd_scale.checkpoint import Checkpointer
    from dopsd_scale.trainer import Trainer

    cfg = config_from_dict(config)
    ray_checkpoint = ray.train.get_checkpoint()
    if ray_checkpoint is not None and Checkpointer(cfg.run.output_dir).latest() is None:
        cfg.checkpoint.resume = ray_checkpoint.path

    def report(step: int, record: dict) -> None:
        ray.train.report({"step": step, **record})

    with Trainer(cfg, on_log=report) as trainer:
        trainer.fit()


def build_trainer(cfg: Config) -> TorchTrainer:
    r = cfg.ray
    out = Path(cfg.run.output_dir).resolve()
    cfg.run.output_dir = str(out)  # workers may start in another directory
    resources = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(cfg),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=r.name or f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(r.storage_path).resolve()) if r.storage_path else str(out / "ray"),
            failure_config=FailureConfig(max_failures=r.max_failures),
        ),
    )


def connect(address: str | None) -> None:
    """Join the cluster `ray job submit` or the user named; else start a private local one."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:  # "local" avoids attaching to a stale cluster file after `ray stop`
        ray.init(address="local", object_store_memory=256 * 2**20, include_dashboard=False)


def forward_stop_signals(run_dir: str) -> None:
    """`ray job stop` (SIGTERM) or Ctrl-C on the driver: ask the workers to checkpoint and stop.

    The workers see a stop file in the shared run directory; the driver keeps waiting for them
    (give the job a stop grace period: RAY_JOB_STOP_WAIT_TIME_S in launch/ray_runtime_env.yaml).
    """

    def handle(signum, frame):
        path = request_stop(run_dir)
        log.warning("signal %d: asked the trainer to checkpoint and stop (%s)", signum, path)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"ray_train: error: {err}", file=sys.stderr)
        return 2
    connect(args.address)
    forward_stop_signals(cfg.run.output_dir)
    result = build_trainer(cfg).fit()
    if result.error is not None:
        log.error("training failed: %s", result.error)
        return 1
    log.info("training finished; Ray run stored in %s", result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
