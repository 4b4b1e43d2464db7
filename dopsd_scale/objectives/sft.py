"""SFT baseline: flow matching on the target image's latents (off-policy, for comparisons).

The student sees `x_sigma = (1 - sigma) x0 + sigma eps` at a noise level drawn from the
few-step schedule it runs at, and regresses the velocity `eps - x0`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..flow import noised
from .dopsd import BackwardFn, RolloutStats, plain_backward

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SFTObjective:
    def __init__(self, sigmas: torch.Tensor, weight: float = 1.0):
        self.sigmas = sigmas[:-1].float()  # the trained noise levels (sigma_K = 0 is data)
        self.weight = weight

    def __call__(self, student: VelocityFn, latents: Optional[torch.Tensor], noise: torch.Tensor,
                 loss_scale: float = 1.0, generator: Optional[torch.Generator] = None,
                 backward: BackwardFn = plain_backward) -> RolloutStats:
        if latents is None:
            raise ValueError("objective.kind=sft needs target latents: cache features with --latents")
        idx = torch.randint(len(self.sigmas), (noise.shape[0],), generator=generator)
        sigma = self.sigmas[idx].to(noise.device)
        x = noised(latents, noise, sigma)
        v_s = student(x, sigma)
        loss = self.weight * torch.mean((v_s.float() - (noise - latents).float()) ** 2)
        backward(loss * loss_scale, True)
        return RolloutStats(loss=loss.item(), loss_per_step=[loss.item()], gap_per_step=[None], student_forwards=1)
