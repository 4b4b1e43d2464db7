"""`ray job submit` of the debug training against a real local Ray cluster; `ray job stop`."""

from __future__ import annotations

import json
import subprocess
import time

from dopsd_scale.checkpoint import load_student_weights, resolve_checkpoint
from dopsd_scale.metrics import read_metrics
from dopsd_scale.models import get_spec

from ..conftest import REPO
from .conftest import BIN, launch_env

CONFIG = "launch/configs/debug_zimage.yaml"


def _overrides(models, features, run, *extra):
    return [
        f"model.path={models['pipeline']}",
        f"data.path={features}",
        f"run.output_dir={run}",
        "metrics.tensorboard=false",
        "metrics.log_every=1",
        "ray.num_workers=2",
        "parallel.kind=fsdp2",
        "data.batch_size=1",
        *extra,
    ]


def _submit(address, *args, extra_env=None, timeout=600):
    env = {**launch_env(), "RAY_ADDRESS": address, **(extra_env or {})}
    return subprocess.run(
        ["bash", "launch/submit.sh", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _job_status(address, job_id):
    out = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", address, job_id],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout + out.stderr


def test_ray_job_submit_trains_and_writes_checkpoints(ray_cluster, debug_models, features, tmp_path):
    run = tmp_path / "run"
    out = _submit(
        ray_cluster,
        "train",
        CONFIG,
        *_overrides(debug_models, features, run, "run.max_steps=4", "checkpoint.every_steps=2"),
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert resolve_checkpoint(run / "checkpoints").name == "step_00000004"
    assert (run / "export" / "model_index.json").is_file()


def test_ray_job_stop_leaves_a_loadable_checkpoint(ray_cluster, debug_models, features, tmp_path):
    run = tmp_path / "run"
    out = _submit(
        ray_cluster,
        "train",
        CONFIG,
        *_overrides(debug_models, features, run, "run.max_steps=100000"),
        extra_env={"NO_WAIT": "1", "SUBMISSION_ID": f"dopsd-stop-{int(time.time())}"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = next(w for w in (out.stdout + out.stderr).split() if w.startswith("'dopsd-stop-")).strip("'")
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(1)
    assert metrics.is_file(), _job_status(ray_cluster, job_id)
    subprocess.run(
        [str(BIN / "ray"), "job", "stop", "--address", ray_cluster, job_id],
        env=launch_env(),
        capture_output=True,
        timeout=300,
    )
    deadline = time.time() + 300
    while time.time() < deadline and "stopped" not in _job_status(ray_cluster, job_id).lower():
        time.sleep(1)
    checkpoint = resolve_checkpoint(run / "checkpoints")
    saved = json.loads((checkpoint / "rank_00000.json").read_text())
    assert saved["step"] >= 2 and not (run / "control" / "stop").exists()
    model = get_spec("zimage", debug_models["pipeline"]).load_transformer()
    load_student_weights(model, checkpoint)  # loadable after the stop
