"""Flow-matching conventions used everywhere inside the project.

`sigma` runs from 1 (pure noise) to 0 (data); `x_sigma = (1 - sigma) * x0 + sigma * eps`;
the velocity is `v = eps - x0 = dx/dsigma`, so `x0 = x - sigma * v` and one Euler step is
`x_next = x + (sigma_next - sigma) * v`. Model specs translate their own conventions to these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of SD3/FLUX/Z-Image schedulers: more steps at high noise for shift > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def schedule(sigmas: Sequence[float]) -> torch.Tensor:
    """sigma_0..sigma_{K-1} plus the final 0, as float64 for exact step sizes."""
    s = torch.tensor(list(sigmas) + [0.0], dtype=torch.float64)
    if not (s[:-1] > s[1:]).all():
        raise ValueError(f"sigmas must be strictly decreasing to 0, got {s.tolist()}")
    return s


def noised(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma = _as_batch(sigma, x0)
    return (1 - sigma) * x0 + sigma * eps


def to_x0(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x - _as_batch(sigma, x) * v


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * v


def euler_rollout(velocity: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Deterministic Euler from `noise` at sigmas[0] to sigmas[-1] (normally 0), without grad."""
    x = noise
    with torch.no_grad():
        for k in range(len(sigmas) - 1):
            sigma = torch.full((x.shape[0],), float(sigmas[k]), device=x.device)
            x = euler_step(x, velocity(x, sigma).to(x.dtype), float(sigmas[k]), float(sigmas[k + 1]))
    return x


def _as_batch(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample sigma [B] (or a scalar) against a [B, ...] tensor."""
    sigma = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    if sigma.ndim == 0:
        return sigma
    return sigma.view(-1, *([1] * (like.ndim - 1)))
