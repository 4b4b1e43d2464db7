"""D-OPSD actually distils: a few dozen steps bring the prompt-only student's roll-out to the teacher's.

The teacher is the same network with the richer (image-holding) context and an EMA of the
student's weights, as in a real run. Training repeats one batch (fresh noise every step);
the distance is measured on held-out noise, from the student's and the teacher's own roll-outs.
"""

from __future__ import annotations

import torch

from dopsd_scale.flow import euler_rollout
from dopsd_scale.trainer import Trainer

STEPS = 60
FACTOR = 5.0  # the roll-out distance must shrink at least this much (about 10x was measured)


def _rollout_distance(trainer: Trainer, batch, noise) -> float:
    spec, sigmas = trainer.spec, trainer.objective.sigmas
    student = euler_rollout(lambda x, s: spec.velocity(trainer.model, x, s, batch.student), noise, sigmas)
    teacher = euler_rollout(lambda x, s: spec.velocity(trainer.teacher.module, x, s, batch.teacher), noise, sigmas)
    return torch.mean((student - teacher) ** 2).item()


def test_dopsd_moves_the_student_rollout_onto_the_teacher(make_config):
    cfg = make_config(
        "teacher.kind=ema",
        "teacher.ema_decay=0.999",
        "optim.lr=3e-4",
        "optim.warmup_steps=10",
        f"run.max_steps={STEPS}",
    )
    trainer = Trainer(cfg)
    batch = next(trainer.loader)
    noise = torch.randn(
        (len(batch), *trainer.spec.latent_shape(*batch.bucket)), generator=torch.Generator().manual_seed(99)
    )
    before = _rollout_distance(trainer, batch, noise)
    losses = []
    for _ in range(STEPS):
        stats = trainer.train_step(batch).main
        trainer.step += 1
        losses.append(float(stats.loss))
    after = _rollout_distance(trainer, batch, noise)
    print(
        f"student-teacher roll-out MSE {before:.3e} -> {after:.3e} ({before / after:.1f}x); "
        f"loss {losses[0]:.3e} -> {losses[-1]:.3e}"
    )
    assert after * FACTOR < before
    assert sum(losses[-10:]) * FACTOR < sum(losses[:10])
