"""FSDP2 on 2 CPU ranks (gloo, torchrun): same losses as one process, resharded resume, export.

Both runs also roll out an anchor stream (prompt-only self-distillation beside the main batch),
so the comparison covers the anchored step and its second resumable data position."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from dopsd_scale.checkpoint import load_student_weights
from dopsd_scale.config import load_config
from dopsd_scale.metrics import read_metrics
from dopsd_scale.trainer import Trainer

from ..conftest import DEBUG_CONFIG
from .conftest import torchrun_train, train_overrides, train_single

STEPS = 4
# fp32 everywhere; only the order of reductions differs between the two runs
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, debug_models, uniform_features, uniform_anchors):
    run = tmp_path_factory.mktemp("single") / "run"
    return train_single(run, debug_models, uniform_features, f"run.max_steps={STEPS}", f"anchor.path={uniform_anchors}")


def _fsdp_overrides(debug_models, features, anchors, run, *extra):
    return train_overrides(
        debug_models,
        features,
        run,
        "parallel.kind=fsdp2",
        "data.batch_size=1",
        f"run.max_steps={STEPS}",
        "checkpoint.every_steps=2",
        f"anchor.path={anchors}",
        *extra,
    )


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, debug_models, uniform_features, uniform_anchors):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    # background (async) checkpoint writes: the checkpoints the other tests load were written so
    torchrun_train(
        2, _fsdp_overrides(debug_models, uniform_features, uniform_anchors, run, "checkpoint.async_save=true")
    )
    return run


def _losses(run, key="loss"):
    return {r["step"]: r[key] for r in read_metrics(run)}


def test_fsdp2_matches_single_process(single_run, fsdp_run):
    for key in ("loss", "anchor_loss"):
        single, sharded = _losses(single_run, key), _losses(fsdp_run, key)
        assert sorted(sharded) == list(range(1, STEPS + 1))
        for step in single:
            assert sharded[step] == pytest.approx(single[step], rel=LOSS_RTOL), (key, step)


def test_fsdp2_anchored_run_resumes_bit_for_bit_on_two_ranks(
    fsdp_run, debug_models, uniform_features, uniform_anchors, tmp_path
):
    resumed = tmp_path / "resumed"
    torchrun_train(
        2,
        _fsdp_overrides(
            debug_models,
            uniform_features,
            uniform_anchors,
            resumed,
            f"checkpoint.resume={fsdp_run / 'checkpoints' / 'step_00000002'}",
        ),
    )
    for key in ("loss", "anchor_loss", "grad_norm"):
        straight, again = _losses(fsdp_run, key), _losses(resumed, key)
        assert sorted(again) == [3, 4]
        assert all(again[s] == straight[s] for s in (3, 4)), key


def test_fsdp2_checkpoint_resumes_on_one_rank(fsdp_run, debug_models, uniform_features, uniform_anchors, tmp_path):
    resumed = tmp_path / "resumed"
    cfg = load_config(
        str(DEBUG_CONFIG),
        train_overrides(
            debug_models,
            uniform_features,
            resumed,
            "data.batch_size=2",
            f"run.max_steps={STEPS + 2}",
            f"checkpoint.resume={fsdp_run / 'checkpoints' / 'step_00000004'}",
            "checkpoint.export_final=false",
            f"anchor.path={uniform_anchors}",
        ),
    )
    trainer = Trainer(cfg)
    trainer.fit()
    assert trainer.step == STEPS + 2
    steps = [r["step"] for r in read_metrics(resumed)]
    assert steps == [STEPS + 1, STEPS + 2]


def test_export_from_fsdp2_checkpoint_loads_in_diffusers(fsdp_run, debug_models, tmp_path):
    exported = ZImageTransformer2DModel.from_pretrained(str(fsdp_run / "export" / "transformer"))
    plain = ZImageTransformer2DModel.from_pretrained(str(debug_models["pipeline"] / "transformer"))
    load_student_weights(plain, fsdp_run / "checkpoints")
    for (name, a), b in zip(exported.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
