"""Anchor prompts: text-only self-distillation beside the main batch (loss, gradient, start-up checks)."""

from __future__ import annotations

import pytest
import torch

from dopsd_scale.config import ConfigError
from dopsd_scale.trainer import Trainer


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _anchor_part(trainer: Trainer, anchor, loss_scale: float = 1.0):
    noise, gen = trainer._noise(anchor, stream=1)
    student = trainer._velocity_fn(trainer.model, anchor.student)
    teacher = trainer._velocity_fn(trainer.teacher.module, anchor.teacher)
    return trainer.anchor_objective(
        student, teacher, noise, loss_scale=loss_scale, generator=gen, backward=trainer.strategy.backward
    )


def test_an_anchor_step_at_initialisation_has_zero_loss(make_config, anchor_features):
    """Teacher = student (the EMA starts as a copy) and the teacher's condition is the same prompt."""
    trainer = Trainer(make_config(f"anchor.path={anchor_features}"))
    anchor = next(trainer.anchor_loader)
    assert torch.equal(anchor.student.feats, anchor.teacher.feats)
    trainer.strategy.zero_grad()
    stats = _anchor_part(trainer, anchor)
    assert float(stats.loss) == 0.0 and all(float(g) == 0.0 for g in stats.gap_per_step)
    assert all(float(g.abs().max()) == 0.0 for g in _grads(trainer.model).values())


def test_a_mixed_step_gradient_is_the_sum_of_its_parts(make_config, anchor_features):
    trainer = Trainer(make_config(f"anchor.path={anchor_features}", "anchor.weight=0.5"))
    with torch.no_grad():  # a teacher that has drifted from the student, so both parts have gradients
        for p in trainer.teacher.module.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch, anchor = next(trainer.loader), next(trainer.anchor_loader)
    trainer.strategy.zero_grad()
    both = trainer.accumulate_gradients(batch, anchor)
    mixed = _grads(trainer.model)
    trainer.strategy.zero_grad()
    trainer.accumulate_gradients(batch)
    main = _grads(trainer.model)
    trainer.strategy.zero_grad()
    _anchor_part(trainer, anchor, loss_scale=0.5)
    anchored = _grads(trainer.model)
    assert float(both.anchor.loss) > 0 and len(mixed) > 10
    for name, g in mixed.items():
        torch.testing.assert_close(g, main[name] + anchored[name], atol=1e-6, rtol=1e-5)


def test_sft_with_the_same_anchor(make_config, anchor_features):
    trainer = Trainer(make_config(f"anchor.path={anchor_features}", "objective.kind=sft"))
    with torch.no_grad():
        for p in trainer.teacher.module.parameters():
            p.add_(0.02 * torch.randn_like(p))
    stats = trainer.train_step(next(trainer.loader), next(trainer.anchor_loader))
    assert stats.main.teacher_forwards == 0 and stats.anchor.teacher_forwards == 4
    assert float(stats.anchor.loss) > 0


def test_a_missing_or_wrong_anchor_set_stops_at_start_up(make_config, features, tmp_path):
    with pytest.raises(ConfigError, match="anchor.path.*directory not found"):
        make_config(f"anchor.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="anchor.path.*not an anchor set"):
        Trainer(make_config(f"anchor.path={features}"))


def test_validation_grid_includes_anchor_prompts(make_config, anchor_features):
    from dopsd_scale.validation import validation_features

    cfg = make_config(f"anchor.path={anchor_features}", "anchor.val_prompts=3")
    plain = make_config()
    assert len(validation_features(cfg)) == len(validation_features(plain)) + 3


@pytest.mark.parametrize(
    "extra",
    [["teacher.kind=frozen"], ["teacher.kind=live"], ["model.finetune=lora", "lora.rank=4", "lora.alpha=8"]],
    ids=["frozen", "live", "lora"],
)
def test_anchoring_with_every_teacher_kind_and_lora(make_config, anchor_features, extra):
    trainer = Trainer(
        make_config(
            f"anchor.path={anchor_features}",
            "run.max_steps=2",
            "metrics.val_every=-1",
            "checkpoint.export_final=false",
            *extra,
        )
    )
    trainer.fit()
    assert trainer.step == 2
    from dopsd_scale.metrics import read_metrics

    record = read_metrics(trainer.run_dir)[-1]
    assert "anchor_loss" in record and record["anchor_loss"] >= 0
