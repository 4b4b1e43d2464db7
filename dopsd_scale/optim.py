"""AdamW and the learning-rate schedule (linear warm-up, then constant or cosine)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import OptimConfig

# A step skipped for a non-finite loss advances the schedule without an optimizer step, on purpose.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=True
    )


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))


# The schedule's lambdas and base LRs come from the config, the rest (the step count and the
# last LRs it set) from a checkpoint: a resumed run keeps its position, and a changed optim.lr applies.
_FROM_CONFIG = ("lr_lambdas", "base_lrs")


def schedule_state(schedule: LambdaLR) -> dict:
    """The schedule's position as JSON-able values (its public `state_dict()`, minus the lambdas)."""
    return {k: v for k, v in schedule.state_dict().items() if k not in _FROM_CONFIG}


def load_schedule_state(schedule: LambdaLR, state: dict) -> None:
    """Restore a position saved by `schedule_state` (or an older `{"last_epoch": n}`)."""
    schedule.load_state_dict({**schedule.state_dict(), **{k: v for k, v in state.items() if k not in _FROM_CONFIG}})
