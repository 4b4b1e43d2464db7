"""What a roll-out and an optimizer step measured, kept on the device until a logging step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class RolloutStats:
    """What one roll-out measured. Values are detached 0-dim tensors on the compute device, so
    nothing synchronises with the host until the trainer logs them (once per `log_every`)."""

    loss: torch.Tensor | float = 0.0
    """Mean distillation loss over the trained steps (what was back-propagated, before scaling)."""
    loss_per_step: list[Optional[torch.Tensor]] = field(default_factory=list)
    gap_per_step: list[Optional[torch.Tensor]] = field(default_factory=list)
    """Velocity MSE between student and teacher per step (unweighted), None where untrained."""
    student_forwards: int = 0
    teacher_forwards: int = 0
    final_x: Optional[torch.Tensor] = None


@dataclass
class StepStats:
    """What one optimizer step measured (device tensors until logged)."""

    main: RolloutStats
    anchor: Optional[RolloutStats] = None
    grad_norm: Optional[torch.Tensor] = None
    stop: bool = False

    @property
    def total_loss(self):
        """Main plus anchor loss (unweighted): one value whose finiteness decides the step."""
        return self.main.loss if self.anchor is None else self.main.loss + self.anchor.loss


def _values(stats: RolloutStats) -> list:
    return [stats.loss, *[v for v in stats.loss_per_step + stats.gap_per_step if v is not None]]


def _rebuild(stats: RolloutStats, host) -> RolloutStats:
    loss = next(host)
    per_step = [None if v is None else next(host) for v in stats.loss_per_step]
    gaps = [None if v is None else next(host) for v in stats.gap_per_step]
    return RolloutStats(loss, per_step, gaps, stats.student_forwards, stats.teacher_forwards)


def to_host(stats: RolloutStats) -> RolloutStats:
    """The stats as Python floats (one transfer for all of them)."""
    return step_to_host(StepStats(main=stats))[0]


def step_to_host(step: StepStats) -> tuple[RolloutStats, Optional[RolloutStats], float]:
    """(main, anchor, grad norm) as Python floats, in ONE device-to-host transfer."""
    values = _values(step.main) + (_values(step.anchor) if step.anchor is not None else [])
    values.append(step.grad_norm if step.grad_norm is not None else 0.0)
    device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
    host = iter(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).detach() for v in values]).tolist())
    main = _rebuild(step.main, host)
    anchor = _rebuild(step.anchor, host) if step.anchor is not None else None
    return main, anchor, next(host)


def mean_present(values: list[Optional[float]]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else 0.0
