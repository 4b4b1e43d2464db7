"""End to end: train the debug model, then meet the exports with diffusers' own classes."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from safetensors.torch import load_file

from dopsd_scale.checkpoint import load_student_weights
from dopsd_scale.config import load_config
from dopsd_scale.metrics import read_metrics
from dopsd_scale.models import Condition
from dopsd_scale.trainer import Trainer

from .conftest import DEBUG_CONFIG, run_dopsd


def _config(run_dir, debug_models, features, *overrides):
    base = [f"model.path={debug_models['pipeline']}", f"data.path={features}", f"run.output_dir={run_dir}"]
    return load_config(str(DEBUG_CONFIG), base + list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, debug_models, features):
    run_dir = tmp_path_factory.mktemp("run") / "debug"
    cfg = _config(
        run_dir,
        debug_models,
        features,
        "run.max_steps=12",
        "checkpoint.every_steps=6",
        "metrics.log_every=4",
        "metrics.val_every=6",
    )
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer, run_dir


def test_run_directory_holds_everything(trained):
    _, run = trained
    assert (run / "config.yaml").is_file()
    records = read_metrics(run)
    assert [r["step"] for r in records] == [4, 8, 12]
    for key in (
        "loss",
        "grad_norm",
        "lr",
        "samples_per_s",
        "tflops",
        "teacher_student_gap",
        "data_wait_share",
        *[f"loss_step_{k}" for k in range(4)],
        *[f"gap_step_{k}" for k in range(4)],
    ):
        assert key in records[-1], key
    assert records[-1]["tflops"] > 0 and "mfu" not in records[-1]  # no known peak on CPU
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000012" and (run / "checkpoints" / latest / ".metadata").is_file()
    assert sorted(p.name for p in (run / "validation").glob("*.png")) == ["step_00000006.png", "step_00000012.png"]
    assert (run / "export" / "model_index.json").is_file()
    assert any((run / "tensorboard").iterdir())


def test_export_loads_in_diffusers_and_matches_the_trained_model(trained):
    trainer, run = trained
    exported = ZImageTransformer2DModel.from_pretrained(str(run / "export" / "transformer"))
    spec = trainer.spec
    x = torch.randn(2, *spec.latent_shape(32, 48), generator=torch.Generator().manual_seed(0))
    feats = torch.randn(2, 7, exported.config.cap_feat_dim, generator=torch.Generator().manual_seed(1))
    cond = Condition(feats, torch.tensor([[True] * 7, [True] * 4 + [False] * 3]))
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        torch.testing.assert_close(
            spec.velocity(exported, x, sigma, cond), spec.velocity(trainer.model, x, sigma, cond)
        )
    base = ZImageTransformer2DModel.from_pretrained(str(trainer.spec.transformer_dir))
    changed = [n for (n, p), q in zip(exported.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert len(changed) > 10  # training really changed the weights


def test_exported_pipeline_runs_in_stock_zimage_pipeline(trained):
    _, run = trained
    pipe = ZImagePipeline.from_pretrained(str(run / "export"))
    out = pipe(
        "a red circle on a blue background",
        height=32,
        width=32,
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images[0]
    assert image.size == (32, 32)


def test_cli_sample_and_export_from_checkpoint(trained, debug_models, tmp_path):
    _, run = trained
    samples = tmp_path / "samples"
    run_dopsd(
        "sample",
        "--model",
        str(debug_models["pipeline"]),
        "--checkpoint",
        str(run / "checkpoints"),
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue square",
        "--out",
        str(samples),
        "--height",
        "32",
        "--width",
        "48",
    )
    assert sorted(p.name for p in samples.glob("*.png")) == ["grid.png", "sample_000.png", "sample_001.png"]
    out = tmp_path / "exported"
    run_dopsd(
        "export",
        "--model",
        str(debug_models["pipeline"]),
        "--checkpoint",
        str(run / "checkpoints" / "step_00000012"),
        "--out",
        str(out),
    )
    ours = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    final = load_file(str(run / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == final.keys() and all(torch.equal(ours[k], final[k]) for k in ours)


@pytest.mark.parametrize(
    "async_save,anchored", [(False, False), (True, False), (False, True)], ids=["sync", "async", "anchored"]
)
def test_resume_continues_the_same_run_bitwise(tmp_path, debug_models, features, anchor_features, async_save, anchored):
    common = [
        "metrics.log_every=1",
        "metrics.val_every=-1",
        "checkpoint.export_final=false",
        "metrics.tensorboard=false",
        "run.deterministic=true",
        "data.shuffle_buffer=8",
        f"checkpoint.async_save={str(async_save).lower()}",
        "checkpoint.every_steps=2",
    ]
    if anchored:  # two streams, each with its own resumable position
        common += [f"anchor.path={anchor_features}", "anchor.batch_size=1"]
    straight = tmp_path / "straight"
    Trainer(_config(straight, debug_models, features, "run.max_steps=8", *common)).fit()
    resumed = tmp_path / "resumed"
    Trainer(_config(resumed, debug_models, features, "run.max_steps=4", *common)).fit()
    trainer = Trainer(_config(resumed, debug_models, features, "run.max_steps=8", *common))
    trainer.fit()
    a = {r["step"]: r for r in read_metrics(straight)}
    b = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(b) == list(range(1, 9))
    for step in range(5, 9):
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["grad_norm"] == b[step]["grad_norm"], step
        assert a[step].get("anchor_loss") == b[step].get("anchor_loss"), step
    assert ("anchor_loss" in a[8]) == anchored
    weights = []
    for run in (straight, resumed):
        model = trainer.spec.load_transformer()
        load_student_weights(model, run / "checkpoints")
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, debug_models, features, monkeypatch):
    import torch.distributed.checkpoint as dcp

    cfg = _config(
        tmp_path / "run",
        debug_models,
        features,
        "run.max_steps=2",
        "checkpoint.every_steps=1",
        "metrics.val_every=-1",
        "checkpoint.export_final=false",
        "metrics.tensorboard=false",
    )
    trainer = Trainer(cfg)
    real_save = dcp.save
    calls = {"n": 0}

    def flaky_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    assert trainer.checkpointer.latest().name == "step_00000001"
    monkeypatch.setattr(dcp, "save", real_save)
    again = Trainer(cfg)
    assert again.resume() and again.step == 1
