"""A real local Ray cluster on loopback for the launch tests (started with the `ray` CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..distributed.conftest import free_port

BIN = Path(sys.executable).parent


def launch_env() -> dict:
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head` on 127.0.0.1 with 2 CPUs; yields the dashboard (job API) address."""
    env = launch_env()
    port, dash = free_port(), free_port()
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 60
    while time.time() < deadline:  # the job API comes up a little after `ray start` returns
        probe = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, timeout=60
        )
        if probe.returncode == 0:
            break
        time.sleep(1)
    yield address
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
