"""The D-OPSD objective: gradient equivalence, no gradient into the teacher or through time, EMA."""

from __future__ import annotations

import copy

import pytest
import torch

from dopsd_scale.flow import schedule
from dopsd_scale.models import Condition, get_spec
from dopsd_scale.objectives import DOPSDObjective, SFTObjective, parse_steps
from dopsd_scale.teacher import Teacher


@pytest.fixture(scope="module")
def setup(debug_models):
    spec = get_spec("zimage", debug_models["pipeline"])
    model = spec.load_transformer()
    gen = torch.Generator().manual_seed(3)
    dim = model.config.cap_feat_dim

    def cond(lengths, pad):
        feats = torch.randn(len(lengths), pad, dim, generator=gen)
        mask = torch.arange(pad)[None] < torch.tensor(lengths)[:, None]
        return Condition(feats, mask)

    student_c, teacher_c = cond([5, 9], 9), cond([14, 20], 20)
    noise = torch.randn(2, *spec.latent_shape(32, 48), generator=gen)
    return spec, model, student_c, teacher_c, noise


def _fns(spec, student, teacher, sc, tc, record=None):
    def s(x, sigma):
        if record is not None:
            record.append(x.requires_grad)
        return spec.velocity(student, x, sigma, sc)

    return s, lambda x, sigma: spec.velocity(teacher, x, sigma, tc)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("space", ["x0", "velocity"])
def test_per_step_backward_equals_one_backward_of_the_sum(setup, space):
    spec, model, sc, tc, noise = setup
    teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    grads, losses = [], []
    for per_step in (True, False):
        model.zero_grad(set_to_none=True)
        obj = DOPSDObjective(schedule([1.0, 0.9, 0.75, 0.5]), space=space, per_step_backward=per_step)
        stats = obj(*_fns(spec, model, teacher, sc, tc), noise)
        grads.append(_grads(model))
        losses.append([float(v) for v in stats.loss_per_step])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert all(v > 0 for v in losses[0])


def test_no_gradient_reaches_the_teacher_or_flows_through_time(setup):
    spec, model, sc, tc, noise = setup
    for kind in ("ema", "live"):
        model.zero_grad(set_to_none=True)
        teacher = Teacher(model, kind=kind, decay=0.9)
        seen_requires_grad = []
        obj = DOPSDObjective(schedule([1.0, 0.9, 0.75, 0.5]))
        stats = obj(*_fns(spec, model, teacher.module, sc, tc, record=seen_requires_grad), noise)
        assert seen_requires_grad == [False] * 4  # every step starts from a detached state
        assert stats.final_x.grad_fn is None
        if kind == "ema":
            assert all(p.grad is None for p in teacher.module.parameters())
            assert not any(p.requires_grad for p in teacher.module.parameters())
        assert any(p.grad is not None for p in model.parameters())


def test_gradient_equals_manual_detached_computation(setup):
    """The objective's gradient is that of sum_k d(v_S(x_k), v_T(x_k)) with x_k held constant."""
    spec, model, sc, tc, noise = setup
    teacher = copy.deepcopy(model).requires_grad_(False)
    sig = schedule([1.0, 0.5])
    model.zero_grad(set_to_none=True)
    DOPSDObjective(sig, space="velocity")(*_fns(spec, model, teacher, sc, tc), noise)
    ours = _grads(model)
    model.zero_grad(set_to_none=True)
    total, x = 0.0, noise
    for k in range(2):
        s = torch.full((2,), float(sig[k]))
        v_t = spec.velocity(teacher, x, s, tc).detach()
        v_s = spec.velocity(model, x, s, sc)
        total = total + torch.mean((v_s - v_t) ** 2) / 2
        x = (x + (sig[k + 1] - sig[k]) * v_s).detach().float()
    total.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(ours[name], g, atol=1e-6, rtol=1e-5)


def test_step_selection():
    assert parse_steps("all", 4) == [True] * 4
    assert parse_steps("last", 4) == [False, False, False, True]
    picked = parse_steps("random:2", 4, torch.Generator().manual_seed(0))
    assert sum(picked) == 2
    with pytest.raises(ValueError, match="random:N"):
        parse_steps("random:5", 4)


def test_untrained_steps_skip_the_teacher(setup):
    spec, model, sc, tc, noise = setup
    obj = DOPSDObjective(schedule([1.0, 0.9, 0.75, 0.5]), steps="last")
    stats = obj(*_fns(spec, model, model, sc, tc), noise)
    assert stats.teacher_forwards == 1 and stats.student_forwards == 4
    assert stats.loss_per_step[:3] == [None] * 3


def test_ema_arithmetic(setup):
    _, model, *_ = setup
    student = copy.deepcopy(model)
    teacher = Teacher(student, kind="ema", decay=0.9)
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student)
    for t0, t, s in zip(before, teacher.module.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    frozen = Teacher(student, kind="frozen")
    snapshot = [p.clone() for p in frozen.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    frozen.update(student)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, frozen.module.parameters()))
    live = Teacher(student, kind="live")
    assert live.module is student and live.state_dict() == {}
    with pytest.raises(ValueError, match="ema_decay"):
        Teacher(student, kind="ema", decay=1.5)


def test_sft_regresses_the_flow_matching_velocity(setup):
    spec, model, sc, _, noise = setup
    latents = torch.randn_like(noise)
    obj = SFTObjective(schedule([1.0, 0.5]), sampling="rollout")
    model.zero_grad(set_to_none=True)
    stats = obj(
        lambda x, s: spec.velocity(model, x, s, sc),
        None,
        noise,
        latents=latents,
        generator=torch.Generator().manual_seed(0),
    )
    assert stats.loss > 0 and any(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="latents"):
        obj(lambda x, s: x, None, noise)


def test_sft_samples_the_shifted_continuous_schedule(setup):
    """`shifted` trains every noise level the 8-step sampler visits (Z-Image-Turbo's last is ~0.3),
    with the model's time shift; `rollout` only the roll-out schedule's levels (never below 0.5)."""
    spec, *_ = setup
    gen = torch.Generator().manual_seed(0)
    shifted = SFTObjective(schedule([1.0, 0.9, 0.75, 0.5]), shift=spec.shifted_sigmas).sample_sigmas(4000, gen)
    rollout = SFTObjective(schedule([1.0, 0.9, 0.75, 0.5]), sampling="rollout").sample_sigmas(4000, gen)
    assert set(rollout.tolist()) == {1.0, 0.8999999761581421, 0.75, 0.5}
    assert float(shifted.min()) < 0.3 and float(shifted.max()) <= 1.0 and len(set(shifted.tolist())) > 3000
    # shift 3: P(sigma < 0.5) = P(u < 1/4)
    assert float((shifted < 0.5).float().mean()) == pytest.approx(0.25, abs=0.03)


def test_bf16_student_keeps_a_float32_ema_teacher_that_moves(setup):
    """A 1e-4 lerp is below bf16 resolution: the teacher's own copy is float32 whatever the student's."""
    _, model, *_ = setup
    student = copy.deepcopy(model).to(torch.bfloat16)
    teacher = Teacher(student, kind="ema", decay=0.9999)
    assert all(p.dtype == torch.float32 for p in teacher.module.parameters())
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05)
    for _ in range(3):
        teacher.update(student)
    moved = [float((a - b).abs().max()) for a, b in zip(before, teacher.module.parameters())]
    assert min(moved) > 1e-5  # 3 updates of 1e-4 * 0.05 each
