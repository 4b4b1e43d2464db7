"""The Slurm batch scripts through a real single-node Slurm.

Training to completion, feature caching, and preemption + requeue + resume.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from dopsd_data_tools.inspect_shards import inspect_shards
from dopsd_data_tools.synthetic import make_synthetic_pairs

from dopsd_scale.checkpoint import resolve_checkpoint
from dopsd_scale.metrics import read_metrics

from ..conftest import DEBUG_BUCKETS, REPO
from ..distributed.conftest import free_port
from .conftest import BIN, launch_env
from .slurm_cluster import start_slurm, stop_slurm

CONFIG = "launch/configs/debug_zimage.yaml"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    env = start_slurm(root)
    yield root, env
    stop_slurm(root, env)
    # a cancelled job can leave its Ray driver behind (its node died under it)
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=launch_env(), capture_output=True, timeout=120)


def _sbatch(slurm, script: str, *args: str, wait: bool = True):
    """Submits a batch script of launch/slurm/ for one CPU node; returns (result, environment)."""
    root, slurm_env = slurm
    env = {
        **launch_env(),
        **slurm_env,
        "HEAD_IP": "127.0.0.1",
        "OBJECT_STORE_BYTES": "200000000",
        "CPU_WORKERS": "2",
        "CPU_ACTORS": "2",
        "REPO": str(REPO),
        "VENV": str(Path(os.sys.executable).parents[1]),
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "LOG_DIR": str(root / "logs"),
    }
    cmd = [
        "sbatch",
        *(["--wait"] if wait else ["--parsable"]),
        "--nodes=1",
        "--gpus-per-node=0",
        f"--cpus-per-task={os.cpu_count() or 2}",
        "--time=30",
        f"--output={root}/slurm-%j.out",
        f"launch/slurm/{script}",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900), env


def _train(slurm, run: Path, *overrides: str, wait: bool = True):
    return _sbatch(slurm, "train.sbatch", CONFIG, f"run.output_dir={run}", *overrides, wait=wait)


def _common(models, features):
    return [
        f"model.path={models['pipeline']}",
        f"data.path={features}",
        "metrics.tensorboard=false",
        "metrics.log_every=1",
        "parallel.kind=fsdp2",
        "data.batch_size=1",
        "metrics.val_every=-1",
    ]


def _log(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.glob("slurm-*.out")))


def _diagnosis(slurm, job: str) -> str:
    """What Slurm says about the job and the node, and the daemons' last words: for failure messages."""
    root, env = slurm
    parts = [_log(root)[-3000:]]
    for cmd in (["scontrol", "show", "job", job], ["sinfo", "-N", "-l"]):
        parts.append(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60).stdout)
    for name in ("slurmctld.log", "slurmd.log"):
        path = root / name
        parts.append(f"--- {name}\n" + (path.read_text(errors="replace")[-3000:] if path.is_file() else "(none)"))
    return "\n".join(parts)


def _wait_for_resume(slurm, job: str, deadline: float) -> bool:
    """True once the job has been requeued, runs again and its trainer resumed from a checkpoint.

    The requeued job waits out the credential lifetime (`cred_expire` in the test's slurm.conf)
    before it starts again; a job that ended, a held job or a drained node will not get better,
    so stop early.
    """
    root, env = slurm
    while time.time() < deadline:
        info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        if "Restarts=1" in info and "JobState=RUNNING" in info and "resumed from" in _log(root):
            return True
        node = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
        ended = "Restarts=1" in info and re.search(r"JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL)", info)
        if ended or "Reason=launch_failed" in info or "JobHeld" in info or "drain" in node:
            return False
        time.sleep(2)
    return False


def test_train_sbatch_runs_to_completion(slurm, debug_models, features, tmp_path):
    run = tmp_path / "run"
    out, _ = _train(slurm, run, *_common(debug_models, features), "run.max_steps=3")
    assert out.returncode == 0, out.stderr + _log(slurm[0])
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert resolve_checkpoint(run / "checkpoints").name == "step_00000003"


def test_cache_sbatch_caches_every_pair(slurm, debug_models, tmp_path):
    pairs = make_synthetic_pairs(tmp_path / "pairs", count=8, seed=1)
    out = tmp_path / "features"
    buckets = ",".join(f"{h}x{w}" for h, w in DEBUG_BUCKETS)
    result, _ = _sbatch(
        slurm,
        "cache.sbatch",
        "--input",
        str(pairs),
        "--output",
        str(out),
        "--pipeline",
        str(debug_models["pipeline"]),
        "--teacher-vlm",
        str(debug_models["teacher_vlm"]),
        "--buckets",
        buckets,
        "--shard-size",
        "4",
        "--latents",
        "--threads",
        "1",
        "--vlm-min-pixels",
        str(32 * 32),
        "--vlm-max-pixels",
        str(64 * 64),
    )
    assert result.returncode == 0, result.stderr + _log(slurm[0])[-5000:]
    info = inspect_shards(str(out))
    assert info["samples"] == 8 and info["shards"] == 2, info
    assert (out / "report.jsonl").read_text() == ""


def test_preemption_signal_checkpoints_requeues_and_resumes(slurm, debug_models, features, tmp_path):
    run = tmp_path / "run"
    out, env = _train(slurm, run, *_common(debug_models, features), "run.max_steps=400", wait=False)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(1)
    assert metrics.is_file(), _log(slurm[0])
    # what `#SBATCH --signal=B:USR1@...` does before the time limit or a preemption
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=60)
    resumed = _wait_for_resume(slurm, job, deadline=time.time() + 420)
    diagnosis = _diagnosis(slurm, job)
    subprocess.run(["scancel", job], env=env, timeout=60)
    # the cancelled run's Ray driver loses its cluster and would linger: end it
    subprocess.run(["pkill", "-f", f"run.output_dir={run}"], timeout=60)
    assert resumed, diagnosis
    assert "requeueing job" in _log(slurm[0]), diagnosis
    # the preempted run saved at its last step N; the requeued run starts after N
    resumed_step = int(re.search(r"resumed from \S*step_(\d+)", _log(slurm[0])).group(1))
    steps = [r["step"] for r in read_metrics(run)]
    assert resumed_step >= 2 and (run / "checkpoints" / f"step_{resumed_step:08d}").is_dir()
    assert steps[:resumed_step] == list(range(1, resumed_step + 1))
    assert all(s > resumed_step for s in steps[resumed_step:]), steps
