"""Performance properties that can be checked on a CPU (timings live in the benchmarks, not here):
activation memory of a D-OPSD step flat in K, the compiled blocks' losses, the host syncs of a
training step, the GPU script's smoke run, and the reader's tar walk."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from dopsd_scale.bench import HostSyncCounter, _counting
from dopsd_scale.data.shards import iter_tar_samples, walk_local_tar
from dopsd_scale.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

MEMORY_PROBE = r"""
import copy, sys, torch
from diffusers import ZImageTransformer2DModel
from dopsd_scale.flow import schedule
from dopsd_scale.objectives.dopsd import DOPSDObjective

torch.manual_seed(0)
model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2,
                                 n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                 axes_dims=[8, 12, 12], axes_lens=[256, 128, 128])
teacher = copy.deepcopy(model).requires_grad_(False)
caption = torch.randn(24, 16)

def velocity(net):
    def fn(x, sigma):
        out = net(list(x.unsqueeze(2).unbind(0)), 1 - sigma, [caption], patch_size=2, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)
    return fn

def status_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))

for k in (1, 2, 8):
    objective = DOPSDObjective(schedule(torch.linspace(1, 1 / k, k).tolist()), per_step_backward=sys.argv[1] == "1")
    noise = torch.randn(1, 4, 96, 96)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status_mib("VmRSS:")
    objective(velocity(model), velocity(teacher), noise)
    model.zero_grad(set_to_none=True)
    print(k, status_mib("VmHWM:") - before, flush=True)
"""


def _peak_mib_per_k() -> tuple[dict[int, float], dict[int, float]]:
    """Peak RSS growth (MiB) of one step for each K, one backward of the sum and one per step (two
    processes at once). Large blocks are mmap'ed and unmapped when freed, and the peak is reset
    before each step, so the growth is what the step holds at once, whatever ran before it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MEMORY_PROBE, mode],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for mode in ("0", "1")
    ]
    peaks = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        peaks.append({int(k): float(mib) for k, mib in (line.split() for line in out.splitlines())})
    return peaks[0], peaks[1]


def test_peak_memory_of_a_dopsd_step_does_not_grow_with_k():
    """One process per mode: 2,304 image tokens make the activations of one roll-out step (A,
    about 60-70 MiB) dominate. With one backward per step the step's peak stays flat in K (measured:
    72 / 62 / 62 MiB for K = 1 / 2 / 8); with one backward of the sum it grows by about A per step
    (72 / 119 / 474 MiB), which shows the measurement can fail."""
    summed, per_step = _peak_mib_per_k()
    step_activations = summed[2] - summed[1]
    assert step_activations > 20, summed  # the model is big enough for the measurement to mean something
    assert summed[8] - summed[2] > 4 * step_activations, summed
    assert per_step[8] - per_step[2] < 0.25 * step_activations, (per_step, summed)
    assert per_step[8] - per_step[1] < 0.5 * step_activations, (per_step, summed)


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """torch.compile with the aot_eager backend: Dynamo's capture and AOTAutograd's forward and
    backward graphs (what the trainer's wiring can break: per-block binding, the teacher's deep
    copy, checkpointing, per-step backward) in ~30 s, where inductor's C++ compile of the six graph
    variants takes 2-3 minutes on a 2-core CPU (run by hand: losses within 5e-7 relative)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    yield
    torch._dynamo.reset()


def _losses(trainer: Trainer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(float(trainer.train_step(next(trainer.loader).to(trainer.device)).main.loss))
        trainer.step += 1
    return out


def test_compiled_blocks_give_the_eager_losses(make_config, aot_eager_compile):
    """Three D-OPSD steps (K = 2, gradient checkpointing, frozen teacher so that a teacher bound to
    the student's weights would show) with `model.compile` on and off. Tolerance 1e-5 relative:
    fusion reorders fp32 sums (about 1e-7 per op; 5e-7 measured with inductor after 3 steps),
    while a wrong binding or a broken backward moves step 2's loss by far more."""
    overrides = [
        "data.batch_size=1",
        "objective.num_steps=2",
        "model.gradient_checkpointing=true",
        "teacher.kind=frozen",
        "checkpoint.resume=none",
        "metrics.val_every=-1",
    ]
    with Trainer(make_config(*overrides)) as trainer:
        eager = _losses(trainer, 3)
    with Trainer(make_config(*overrides, "model.compile=true")) as trainer:
        compiled = _losses(trainer, 3)
        for model in (trainer.model, trainer.teacher.module):
            block = model.layers[0]
            assert block.forward.__self__ is block and block.forward.__func__ is not type(block).forward
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_a_non_logging_step_syncs_the_host_once(make_config):
    """The host reads device values once on a non-logging step: the [non-finite, stop] flags; a
    logging step adds the one transfer of `log_metrics` (and its cross-rank reductions)."""
    with Trainer(
        make_config("metrics.log_every=2", "checkpoint.every_steps=0", "metrics.val_every=-1", "checkpoint.resume=none")
    ) as trainer:
        trainer._one_step()
        with _counting(trainer) as logging_step:
            trainer._one_step()
        with _counting(trainer) as plain:
            trainer._one_step()

    def ours(counter):
        return [s for s in counter.sites if s.startswith("device")]

    assert len(ours(plain)) == 1, plain.sites
    assert ours(plain)[0].startswith("device: tolist at trainer.py:") and ours(plain)[0].endswith(" train_step")
    assert len(ours(logging_step)) > 1, logging_step.sites  # the log's transfers are seen
    assert plain.counts["host"] > 0  # host-side reads (schedules, AdamW's step counts) are told apart


def test_the_sync_counter_tells_device_values_from_host_values():
    weight = torch.randn(3, requires_grad=True)
    counter = HostSyncCounter("cpu", [weight])
    with counter:
        loss = (weight * 2).sum()
        float(loss.detach())  # derived from a device weight: a sync
        torch.tensor([1.0, 2.0]).tolist()  # a host tensor: a host read
        bool(loss > 0)
    assert counter.counts == {"device": 2, "host": 1}


def test_gpu_check_smoke_mode_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    subprocess.run(
        ["bash", "launch/gpu_check.sh", str(tmp_path), "--smoke"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["kernel_tests", "kernel_sanity", "attention", "dopsd_step"]
    assert not any("error" in part for part in parts.values()), parts
    assert parts["kernel_tests"]["ok"]
    assert parts["kernel_sanity"]["max_abs_err"]["triton"]["out"] < 1e-4
    assert [row["k"] for row in parts["dopsd_step"]["rows"]] == [1, 2]
    assert all(row["s_per_step"] > 0 and row["model_tflops_per_s"] > 0 for row in parts["dopsd_step"]["rows"])
    assert "## dopsd_step" in (tmp_path / "gpu_check.md").read_text()
    assert time.monotonic() - start < 120


def _tar(path: Path, fmt: int, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime makes tarfile write pax records
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_reader_tar_walk_reads_what_tarfile_reads(tmp_path, fmt):
    members = [
        ("d/" * 60 + "k1.json", b"{}"),
        ("d/" * 60 + "k1.safetensors", bytes(range(256)) * 40),
        ("\u00fc/k2.json", b"[1]"),
        ("\u00fc/k2.safetensors", b"y" * 7),
    ]
    path = _tar(tmp_path / "a.tar", fmt, members)
    walked = [(name, bytes(value)) for name, value in walk_local_tar(str(path), lazy=("safetensors",))]
    assert walked == members


def test_the_reader_tar_walk_reports_what_tarfile_reports(tmp_path):
    members = [(f"{i:03d}.{ext}", bytes(100)) for i in range(3) for ext in ("json", "safetensors")]
    raw = _tar(tmp_path / "a.tar", tarfile.PAX_FORMAT, members).read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        cut = tar.getmembers()[4].offset  # the third sample's first header
    for name, data in (("overwritten", raw[:cut] + b"\x01" * 700), ("truncated", raw[: cut + 700])):
        (tmp_path / name).write_bytes(data)
        errors: list[Exception] = []
        keys = [s["__key__"] for s in iter_tar_samples(str(tmp_path / name), errors.append, lazy=("safetensors",))]
        reference = [s["__key__"] for s in iter_tar_samples(str(tmp_path / name), lambda err: None)]
        assert keys == reference and len(errors) == 1, (name, keys, reference, errors)
        assert keys == (["000", "001"] if name == "overwritten" else keys), keys
