"""Tests that fail on a wrong method, not only on a crash.

A convergence test is symmetric: it passes with student and teacher features swapped, with a
consistent sign flip, with the wrong x0 weighting or without the per-step detach. Each test here
pins one of those down; each was checked to fail when its mistake is made in the code.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dopsd_scale.flow import noised, schedule, to_x0
from dopsd_scale.models import get_spec
from dopsd_scale.objectives import DOPSDObjective, SFTObjective
from dopsd_scale.teacher import Teacher
from dopsd_scale.trainer import Trainer

QUIET = [
    "metrics.val_every=-1",
    "checkpoint.save_final=false",
    "checkpoint.export_final=false",
    "checkpoint.resume=none",
]


def test_the_gradient_branch_gets_the_prompt_only_features(make_config, monkeypatch):
    """Every forward with grad sees the student's (prompt) features; every no-grad one, except the
    untrained roll-out, sees the teacher's context. The debug shards' contexts are longer."""
    trainer = Trainer(make_config(*QUIET))
    batch = next(trainer.loader)
    assert batch.teacher.feats.shape[1] != batch.student.feats.shape[1]
    calls = []
    velocity = trainer.spec.velocity

    def recording(model, x, sigma, cond):
        calls.append((torch.is_grad_enabled(), cond.feats.shape[1]))
        return velocity(model, x, sigma, cond)

    monkeypatch.setattr(trainer.spec, "velocity", recording)
    trainer.train_step(batch)
    with_grad = {length for grad, length in calls if grad}
    without = {length for grad, length in calls if not grad}
    assert with_grad == {batch.student.feats.shape[1]}
    assert without == {batch.teacher.feats.shape[1]}
    assert len(calls) == 2 * trainer.objective.num_steps


@pytest.fixture(scope="module")
def zimage(debug_models):
    spec = get_spec("zimage", debug_models["pipeline"])
    return spec, spec.load_transformer()


def _conditions(model, gen):
    from dopsd_scale.models import Condition

    dim = model.config.cap_feat_dim
    student = Condition(torch.randn(2, 6, dim, generator=gen), torch.ones(2, 6, dtype=torch.bool))
    teacher = Condition(torch.randn(2, 11, dim, generator=gen), torch.ones(2, 11, dtype=torch.bool))
    return student, teacher


def test_x0_space_loss_equals_an_independent_x0_prediction_mse(zimage):
    spec, model = zimage
    gen = torch.Generator().manual_seed(11)
    sc, tc = _conditions(model, gen)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    sigmas = schedule([1.0, 0.9, 0.75, 0.5])
    noise = torch.randn(2, *spec.latent_shape(32, 32), generator=gen)
    stats = DOPSDObjective(sigmas, space="x0")(
        lambda x, s: spec.velocity(model, x, s, sc), lambda x, s: spec.velocity(teacher, x, s, tc), noise
    )
    x = noise
    with torch.no_grad():
        for k in range(4):
            sigma = torch.full((2,), float(sigmas[k]))
            v_s, v_t = spec.velocity(model, x, sigma, sc), spec.velocity(teacher, x, sigma, tc)
            x0_s, x0_t = to_x0(x, v_s, sigma), to_x0(x, v_t, sigma)  # each branch's prediction of the data
            expected = torch.mean((x0_s - x0_t) ** 2)
            assert float(stats.loss_per_step[k]) == pytest.approx(float(expected), rel=1e-5), k
            x = x + (float(sigmas[k + 1]) - float(sigmas[k])) * v_s
    assert float(stats.loss_per_step[3]) < float(stats.gap_per_step[3])  # sigma^2 < 1 weights it down


def test_an_sft_step_moves_the_prediction_toward_the_data(zimage):
    """The target is eps - x0: a small step on the SFT loss brings the x0 prediction at that point
    closer to the target latents (a flipped target would push it away)."""
    spec, base = zimage
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(5)
    sc, _ = _conditions(model, gen)
    latents = torch.randn(2, *spec.latent_shape(32, 32), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    sigma = torch.tensor([0.6, 0.6])
    x = noised(latents, noise, sigma)

    def x0_error() -> float:
        with torch.no_grad():
            return float(torch.mean((to_x0(x, spec.velocity(model, x, sigma, sc), sigma) - latents) ** 2))

    before = x0_error()
    sft = SFTObjective(schedule([0.6]), sampling="rollout")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        sft(lambda xx, s: spec.velocity(model, xx, s, sc), None, noise, latents=latents)
        optimizer.step()
    assert x0_error() < 0.9 * before


@pytest.mark.parametrize("per_step", [True, False])
def test_every_roll_out_step_starts_from_a_detached_state(zimage, per_step):
    """No back-propagation through time: the gradient equals that of the summed per-step losses
    with every state taken as a constant (one backward of the sum included, where a missing detach
    would silently add the through-time terms)."""
    spec, model = zimage
    gen = torch.Generator().manual_seed(3)
    sc, tc = _conditions(model, gen)
    teacher = Teacher(model, "ema", 0.9).module
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    sigmas = schedule([1.0, 0.6, 0.3])
    noise = torch.randn(2, *spec.latent_shape(32, 32), generator=gen)
    objective = DOPSDObjective(sigmas, space="velocity", per_step_backward=per_step)
    model.zero_grad(set_to_none=True)
    objective(lambda x, s: spec.velocity(model, x, s, sc), lambda x, s: spec.velocity(teacher, x, s, tc), noise)
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    x, total = noise, 0.0
    for k in range(3):
        s = torch.full((2,), float(sigmas[k]))
        v_s = spec.velocity(model, x, s, sc)
        total = total + torch.mean((v_s - spec.velocity(teacher, x, s, tc).detach()) ** 2) / 3
        x = (x + (float(sigmas[k + 1]) - float(sigmas[k])) * v_s).detach()
    total.backward()
    for name, g in ((n, p.grad) for n, p in model.named_parameters() if p.grad is not None):
        torch.testing.assert_close(ours[name], g, atol=1e-7, rtol=1e-5)
