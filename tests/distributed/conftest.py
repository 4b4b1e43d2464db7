"""Fixtures for multi-process tests: identical samples, and a torchrun launcher."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from dopsd_data_tools.cache_features import cache_features
from dopsd_data_tools.synthetic import make_synthetic_pairs

from dopsd_scale.config import load_config
from dopsd_scale.trainer import Trainer

from ..conftest import DEBUG_CONFIG, REPO, debug_cache_options


@pytest.fixture(scope="session")
def uniform_features(tmp_path_factory, debug_models) -> Path:
    """8 copies of one pair in 4 shards: any split of the data over ranks sees the same samples,
    so runs at the same global batch must give the same losses whatever the world size."""
    root = tmp_path_factory.mktemp("uniform")
    pairs = root / "pairs"
    pairs.mkdir()
    src = make_synthetic_pairs(root / "one", count=1, seed=7)
    for i in range(8):
        shutil.copy(src / "000000.png", pairs / f"{i:06d}.png")
        shutil.copy(src / "000000.txt", pairs / f"{i:06d}.txt")
    out = root / "features"
    cache_features(replace(debug_cache_options(pairs, out, debug_models), shard_size=2))
    return out


@pytest.fixture(scope="session")
def uniform_anchors(tmp_path_factory, debug_models) -> Path:
    """An anchor set of 8 copies of one prompt in 4 shards (any split over ranks sees the same)."""
    from ..conftest import cache_anchor_set

    return cache_anchor_set(
        tmp_path_factory.mktemp("uanchors"), debug_models, ["a green square on a white background"] * 8
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env() -> dict:
    env = dict(os.environ)
    # PYTHONFAULTHANDLER: a rank that aborts shows where every thread was
    env.update(
        OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1"
    )
    # DeepSpeed JIT-builds its shared-memory CPU collective op (g++/ninja, ~1 min) the first time
    # it starts on CPU: keep the build in a cache folder so later runs load it in milliseconds
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    return env


def train_overrides(models, features, run_dir, *extra) -> list[str]:
    return [
        f"model.path={models['pipeline']}",
        f"data.path={features}",
        f"run.output_dir={run_dir}",
        "metrics.tensorboard=false",
        "metrics.val_every=-1",
        "metrics.log_every=1",
        "run.deterministic=true",
        *extra,
    ]


def train_single(run_dir: Path, models, features, *extra: str) -> Path:
    """The single-process reference run (global batch 2) the sharded runs are compared with."""
    cfg = load_config(
        str(DEBUG_CONFIG),
        train_overrides(models, features, run_dir, "data.batch_size=2", "checkpoint.export_final=false", *extra),
    )
    with Trainer(cfg) as trainer:
        trainer.fit()
    return run_dir


def torchrun_train(
    nproc: int, overrides: list[str], timeout: int = 600, check: bool = True, config: Path = DEBUG_CONFIG
):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
        "-m",
        "dopsd_scale.cli",
        "train",
        "--config",
        str(config),
        *overrides,
    ]
    out = subprocess.run(cmd, cwd=REPO, env=dist_env(), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"torchrun failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out
