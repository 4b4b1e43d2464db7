"""Trainer switches: gradient checkpointing, bf16 autocast, the SFT baseline, the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from dopsd_scale.config import OptimConfig
from dopsd_scale.optim import lr_factor
from dopsd_scale.trainer import Trainer

QUIET = [
    "metrics.val_every=-1",
    "checkpoint.save_final=false",
    "checkpoint.export_final=false",
    "checkpoint.resume=none",
    "checkpoint.every_steps=0",
]


def _first_step_grads(cfg):
    trainer = Trainer(cfg)
    batch = next(trainer.loader)
    trainer.strategy.optimizer_step = lambda: None  # keep the gradients for inspection
    trainer.train_step(batch)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(make_config):
    plain = _first_step_grads(make_config(*QUIET))
    ckpt = _first_step_grads(make_config(*QUIET, "model.gradient_checkpointing=true"))
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_trains(make_config):
    trainer = Trainer(make_config(*QUIET, "run.mixed_precision=bf16", "run.max_steps=3"))
    trainer.fit()
    assert trainer.step == 3 and trainer.skipped_nonfinite == 0


def test_sft_baseline_trains(make_config):
    trainer = Trainer(make_config(*QUIET, "objective.kind=sft", "run.max_steps=3"))
    batch = next(trainer.loader)
    step = trainer.train_step(batch)
    stats, grad_norm = step.main, float(step.grad_norm)
    assert stats.loss > 0 and math.isfinite(grad_norm) and stats.teacher_forwards == 0


def test_non_finite_loss_skips_the_update(make_config):
    trainer = Trainer(make_config(*QUIET))
    batch = next(trainer.loader)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    batch.student.feats[:] = float("nan")
    trainer.train_step(batch)
    assert trainer.skipped_nonfinite == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule(schedule):
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg, max_steps=14) for s in range(15)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    if schedule == "constant":
        assert factors[4:] == [1.0] * 11
    else:
        assert factors[4] == 1.0 and factors[14] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
