"""D-OPSD: the student's own few-step roll-out, matched step by step to the teacher.

Per optimizer step and sample, from Gaussian noise at sigma_0 = 1:

    for k in 0..K-1:
        x = x.detach()                                  # no back-propagation through time
        v_T = teacher(x, sigma_k, c_t)   without grad
        v_S = student(x, sigma_k, c_s)   with grad
        backward(weight * distance(v_S, v_T) / K_trained)  # per-step: 1/K of the activations
        x = x + (sigma_{k+1} - sigma_k) * v_S.detach()

Since x is detached at every step, the K per-step backwards give exactly the gradient of one
backward through the summed loss while holding one student graph at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Optional

import torch

from ..flow import euler_step
from .stats import RolloutStats

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BackwardFn = Callable[[torch.Tensor, bool], None]


def plain_backward(loss: torch.Tensor, last: bool) -> None:
    """`last` marks the final backward of the optimizer step (parallel strategies sync there)."""
    loss.backward()


def parse_steps(steps: str, num_steps: int, generator: Optional[torch.Generator] = None) -> list[bool]:
    """Which roll-out steps are trained: `all`, `last` or `random:N` (N distinct steps)."""
    if steps == "all":
        return [True] * num_steps
    if steps == "last":
        return [k == num_steps - 1 for k in range(num_steps)]
    match = re.fullmatch(r"random:(\d+)", steps)
    if not match or not 1 <= int(match.group(1)) <= num_steps:
        raise ValueError(f"objective.steps={steps!r}: expected all, last or random:N with 1 <= N <= {num_steps}")
    chosen = set(torch.randperm(num_steps, generator=generator)[: int(match.group(1))].tolist())
    return [k in chosen for k in range(num_steps)]


def distance(v_s: torch.Tensor, v_t: torch.Tensor, sigma: float, space: str) -> torch.Tensor:
    """MSE in x0 space (`x0 = x - sigma v`, i.e. sigma^2 * velocity MSE) or in velocity space."""
    mse = torch.mean((v_s.float() - v_t.float()) ** 2)
    return mse * sigma**2 if space == "x0" else mse


class DOPSDObjective:
    def __init__(
        self,
        sigmas: torch.Tensor,
        space: str = "x0",
        steps: str = "all",
        per_step_backward: bool = True,
        weight: float = 1.0,
    ):
        if space not in ("x0", "velocity"):
            raise ValueError(f"objective.space={space!r}: expected x0 or velocity")
        self.sigmas = sigmas  # sigma_0..sigma_K with sigma_K = 0
        self.space, self.steps = space, steps
        self.per_step_backward, self.weight = per_step_backward, weight
        parse_steps(steps, self.num_steps)  # fail early on a bad selector

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def __call__(
        self,
        student: VelocityFn,
        teacher: Optional[VelocityFn],
        noise: torch.Tensor,
        latents: Optional[torch.Tensor] = None,
        loss_scale: float = 1.0,
        generator: Optional[torch.Generator] = None,
        backward: BackwardFn = plain_backward,
        sigmas: Optional[torch.Tensor] = None,
    ) -> RolloutStats:
        """Roll out, back-propagate the loss times `loss_scale` into the student, return stats.

        `latents` (the target) is not used: the teacher's context holds the target instead.
        `sigmas` overrides the schedule for this call (the roll-out schedule of the batch's bucket,
        for families whose schedule depends on the resolution); it has the same K.
        """
        sigmas = self.sigmas if sigmas is None else sigmas
        if len(sigmas) != len(self.sigmas):
            raise ValueError(f"a schedule of {len(sigmas) - 1} steps for an objective of {self.num_steps}")
        trained = parse_steps(self.steps, self.num_steps, generator)
        n_trained = sum(trained)
        last_trained = max(k for k, t in enumerate(trained) if t)
        stats = RolloutStats()
        pending: list[torch.Tensor] = []
        x = noise
        for k in range(self.num_steps):
            x = x.detach()
            s_k, s_next = float(sigmas[k]), float(sigmas[k + 1])
            sigma = torch.full((x.shape[0],), s_k, device=x.device)
            if not trained[k]:
                with torch.no_grad():
                    v_s = student(x, sigma)
                stats.student_forwards += 1
                stats.loss_per_step.append(None)
                stats.gap_per_step.append(None)
                x = euler_step(x, v_s.float(), s_k, s_next)
                continue
            with torch.no_grad():
                v_t = teacher(x, sigma)
            v_s = student(x, sigma)
            stats.student_forwards += 1
            stats.teacher_forwards += 1
            loss_k = self.weight * distance(v_s, v_t, s_k, self.space)
            scaled = loss_k * (loss_scale / n_trained)
            if self.per_step_backward:
                backward(scaled, k == last_trained)
            else:
                pending.append(scaled)
            stats.loss_per_step.append(loss_k.detach())
            stats.gap_per_step.append(distance(v_s.detach(), v_t, 1.0, "velocity"))
            stats.loss = stats.loss + loss_k.detach() / n_trained
            x = euler_step(x, v_s.detach().float(), s_k, s_next)
        if pending:
            backward(torch.stack(pending).sum(), True)
        stats.final_x = x.detach()
        return stats
