"""Ray Train: a rank killed mid-run is restarted by Ray and the run continues bit for bit."""

from __future__ import annotations

import subprocess
import sys

from dopsd_scale.metrics import read_metrics

from ..conftest import DEBUG_CONFIG, REPO
from .conftest import dist_env, torchrun_train, train_overrides

STEPS = 6


def _per_step(run):
    """The last record of each step (a restarted run logs the steps after its checkpoint again)."""
    return {r["step"]: r for r in read_metrics(run)}


def test_killed_worker_is_restarted_and_losses_match_an_uninterrupted_run(tmp_path, debug_models, uniform_features):
    common = [
        "parallel.kind=fsdp2",
        "data.batch_size=1",
        f"run.max_steps={STEPS}",
        "checkpoint.every_steps=2",
        "checkpoint.export_final=false",
    ]
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "launch/ray_train.py",
        "--config",
        str(DEBUG_CONFIG),
        *train_overrides(debug_models, uniform_features, killed, *common),
        "ray.num_workers=2",
        "ray.max_failures=2",
        "run.fault.rank=1",
        "run.fault.step=4",
        "run.fault.kind=kill",
    ]
    env = {**dist_env(), "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "injected fault: rank 1 kill at step 4" in log
    assert "resumed from" in log and "step_00000002" in log
    steps = [r["step"] for r in read_metrics(killed)]
    assert steps[:3] == [1, 2, 3] and steps[-4:] == [3, 4, 5, 6]  # steps 3+ ran again after the restart

    straight = tmp_path / "straight"
    torchrun_train(2, train_overrides(debug_models, uniform_features, straight, *common))
    a, b = _per_step(straight), _per_step(killed)
    for step in range(3, STEPS + 1):
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["grad_norm"] == b[step]["grad_norm"], step
