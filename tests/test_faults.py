"""Failure handling in one process: non-finite steps, the abort after N in a row, SIGTERM, a crash mid-save."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from dopsd_scale.faults import InjectedFault
from dopsd_scale.metrics import read_metrics
from dopsd_scale.trainer import NonFiniteAbort, Trainer

from .conftest import DEBUG_CONFIG, REPO

QUIET = ["metrics.val_every=-1", "checkpoint.export_final=false", "metrics.log_every=1"]


def test_nonfinite_steps_are_skipped_and_counted(make_config):
    trainer = Trainer(
        make_config(
            *QUIET, "run.max_steps=4", "run.fault.rank=0", "run.fault.step=1", "run.fault.kind=nan", "run.fault.count=2"
        )
    )
    trainer.fit()
    records = read_metrics(trainer.run_dir)
    assert [r["skipped_nonfinite"] for r in records] == [1, 2, 2, 2]


def test_too_many_nonfinite_steps_in_a_row_abort(make_config):
    trainer = Trainer(
        make_config(
            *QUIET,
            "run.max_steps=10",
            "run.fault.rank=0",
            "run.fault.step=2",
            "run.fault.kind=nan",
            "run.fault.count=5",
            "run.max_nonfinite_in_row=3",
        )
    )
    with pytest.raises(NonFiniteAbort, match="3 steps in a row.*run.max_nonfinite_in_row=3"):
        trainer.fit()
    assert trainer.step == 3  # steps 2, 3 and 4 were bad: it stopped inside step 4


def test_crash_injected_during_save_keeps_the_previous_checkpoint(make_config):
    cfg = make_config(
        *QUIET,
        "run.max_steps=4",
        "checkpoint.every_steps=2",
        "run.fault.rank=0",
        "run.fault.step=4",
        "run.fault.kind=save",
    )
    with pytest.raises(InjectedFault):
        Trainer(cfg).fit()
    again = Trainer(cfg)
    assert again.checkpointer.latest().name == "step_00000002"
    again.fit()  # the fault fired once: the rerun resumes at 2 and finishes
    assert again.step == 4 and again.checkpointer.latest().name == "step_00000004"


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(debug_models, features, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dopsd_scale.cli",
        "train",
        "--config",
        str(DEBUG_CONFIG),
        f"model.path={debug_models['pipeline']}",
        f"data.path={features}",
        f"run.output_dir={run}",
        "run.max_steps=100000",
        *QUIET,
        "metrics.tensorboard=false",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested" in out
    latest = (run / "checkpoints" / "latest").read_text().strip()
    saved = json.loads((run / "checkpoints" / latest / "rank_00000.json").read_text())
    assert saved["step"] >= 3 and saved["step"] == read_metrics(run)[-1]["step"]
