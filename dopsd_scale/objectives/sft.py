"""SFT baseline: flow matching on the target image's latents (off-policy, for comparisons).

The student sees `x_sigma = (1 - sigma) x0 + sigma eps` and regresses the velocity `eps - x0`.
Where sigma comes from (`objective.sft_sigmas`):
  `shifted` (default) - continuous: `sigma = shift(u)`, u uniform, through the model's own time
                        shift (Z-Image: 3), as common fine-tuning scripts of these models sample
                        it; every noise level the few-step sampler visits is trained, sigma ~0.3
                        of Z-Image-Turbo's 8-step schedule included;
  `rollout`           - only the noise levels of the training roll-out schedule (sigma_0..K-1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from ..flow import noised
from .dopsd import BackwardFn, VelocityFn, plain_backward
from .stats import RolloutStats

SIGMA_SAMPLING = ("shifted", "rollout")


class SFTObjective:
    def __init__(
        self,
        sigmas: torch.Tensor,
        weight: float = 1.0,
        sampling: str = "shifted",
        shift: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        if sampling not in SIGMA_SAMPLING:
            raise ValueError(f"objective.sft_sigmas={sampling!r}: expected one of {', '.join(SIGMA_SAMPLING)}")
        if sampling == "shifted" and shift is None:
            raise ValueError("shifted SFT sigmas need the model's time shift")
        self.sigmas = sigmas[:-1].float()  # the roll-out noise levels (sigma_K = 0 is data)
        self.weight, self.sampling, self.shift = weight, sampling, shift

    def sample_sigmas(
        self, n: int, generator: Optional[torch.Generator] = None, sigmas: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if self.sampling == "rollout":
            levels = self.sigmas if sigmas is None else sigmas[:-1].float()
            return levels[torch.randint(len(levels), (n,), generator=generator)]
        return self.shift(torch.rand(n, generator=generator, dtype=torch.float64)).float()

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
        if latents is None:
            raise ValueError("objective.kind=sft needs target latents: cache features with --latents")
        sigma = self.sample_sigmas(noise.shape[0], generator, sigmas).to(noise.device)
        latents = latents.to(noise.dtype)  # stored bf16 targets: the flow arithmetic runs in fp32
        x = noised(latents, noise, sigma)
        v_s = student(x, sigma)
        loss = self.weight * torch.mean((v_s.float() - (noise - latents).float()) ** 2)
        backward(loss * loss_scale, True)
        return RolloutStats(loss=loss.detach(), loss_per_step=[loss.detach()], gap_per_step=[None], student_forwards=1)
