"""Teacher weights: an EMA of the student, the frozen initial weights, or the live student.

The teacher is the same network as the student; only its conditioning (the richer context)
differs. `live` shares the student's module (decay 0, known to collapse: offered for studies).
EMA arithmetic runs on whatever parameter objects the model holds, so a sharded (FSDP) copy is
updated shard by shard without gathering.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn


def plain_params(module: nn.Module) -> list[torch.Tensor]:
    return [p.data for p in module.parameters()]


class Teacher:
    def __init__(self, student: nn.Module, kind: str = "ema", decay: float = 0.9999):
        if kind not in ("ema", "frozen", "live"):
            raise ValueError(f"teacher.kind={kind!r}: expected ema, frozen or live")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"teacher.ema_decay={decay} must lie in [0, 1]")
        self.kind, self.decay = kind, decay
        # `live` shares the student; the others copy it (before any sharding: the parallel
        # strategy then shards the copy like the student and hands back the wrapped module).
        if kind == "live":
            self.module = student
        else:
            self.module = copy.deepcopy(student).requires_grad_(False).eval()

    @property
    def owns_weights(self) -> bool:
        return self.kind != "live"

    @torch.no_grad()
    def update(self, student: nn.Module,
               local_params: Callable[[nn.Module], list[torch.Tensor]] = plain_params) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, after each optimizer step.

        `local_params` yields the tensors this rank holds (whole weights, or matching shards
        of student and teacher under FSDP/ZeRO-3), so the update never gathers a weight.
        """
        if self.kind != "ema":
            return
        t_params = local_params(self.module)
        s_params = [p.to(t.dtype) for p, t in zip(local_params(student), t_params)]
        torch._foreach_lerp_(t_params, s_params, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.module.state_dict() if self.owns_weights else {}

    def load_state_dict(self, state: dict) -> None:
        if self.owns_weights:
            self.module.load_state_dict(state)
