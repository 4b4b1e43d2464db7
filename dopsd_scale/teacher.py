"""Teacher weights: an EMA of the student, the frozen initial weights, or the live student.

The teacher is the same network as the student; only its conditioning (the richer context)
differs. `live` shares the student's module (decay 0, known to collapse: offered for studies).
EMA arithmetic runs on whatever parameter objects the model holds, so a sharded (FSDP) copy is
updated shard by shard without gathering.

The teacher's own copy is kept in float32 whatever the student's storage dtype: a lerp by
1 - 0.9999 = 1e-4 is far below bfloat16's resolution (about 4e-3 relative), so a bf16 EMA would
never move. Its forward still computes in the run's compute dtype (autocast / FSDP mixed precision).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn


def plain_params(params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """A module's weights, or the given parameters', as plain tensors (one process)."""
    return [p.data for p in (params.parameters() if isinstance(params, nn.Module) else params)]


KINDS = ("ema", "frozen", "live")


def check_teacher_args(kind: str, decay: float) -> None:
    """The one check of a teacher's arguments (the config's `validate` reports the same fields)."""
    if kind not in KINDS:
        raise ValueError(f"teacher.kind={kind!r}: expected ema, frozen or live")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"teacher.ema_decay={decay} must lie in [0, 1]")


class Teacher:
    def __init__(self, student: nn.Module, kind: str = "ema", decay: float = 0.9999):
        check_teacher_args(kind, decay)
        self.kind, self.decay = kind, decay
        # `live` shares the student; the others copy it (before any sharding: the parallel
        # strategy then shards the copy like the student and hands back the wrapped module).
        if kind == "live":
            self.module = student
        else:
            self.module = copy.deepcopy(student).requires_grad_(False).eval().float()

    @property
    def owns_weights(self) -> bool:
        return self.kind != "live"

    @torch.no_grad()
    def update(
        self, student: nn.Module, local_params: Callable[[nn.Module], list[torch.Tensor]] = plain_params
    ) -> None:
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


class AdapterTeacher:
    """LoRA mode: the teacher is part of the student's own model (`dopsd_scale.lora`).

    `ema`: the teacher adapter, an EMA of the student adapter; `frozen`: the bare base, which is
    the initial student exactly (lora_B starts at zero); `live`: the student adapter itself.
    `module` is what the trainer calls for the teacher's forward: a view of the (wrapped) model
    with the teacher's adapter switched on. No second copy of the base exists; under FSDP2 the
    EMA lerps matching local shards of the two adapters, so it never gathers a weight.
    """

    owns_weights = False

    def __init__(self, student: nn.Module, kind: str = "ema", decay: float = 0.9999):
        from .lora import TEACHER, adapter_keys

        check_teacher_args(kind, decay)
        self.kind, self.decay = kind, decay
        self.keys = tuple(adapter_keys(student, TEACHER)) if kind == "ema" else ()
        """The teacher adapter's parameter names in the model (the strategy saves them as the teacher)."""
        self.bind(student)

    def bind(self, model: nn.Module) -> None:
        """Point at the model as the parallel strategy wrapped it (an FSDP2 module, a ZeRO engine)."""
        from .lora import TEACHER, AdapterView

        self.model = model
        self.module = model if self.kind == "live" else AdapterView(model, TEACHER if self.kind == "ema" else None)

    @torch.no_grad()
    def update(
        self, student: nn.Module, local_params: Callable[[nn.Module], list[torch.Tensor]] = plain_params
    ) -> None:
        """teacher adapter <- decay * teacher adapter + (1 - decay) * student adapter.

        The pairs are found on the wrapped model each time (FSDP2 replaces parameters when it
        shards; the walk is a few hundred attribute reads), and `local_params` maps them to this
        rank's tensors.
        """
        if self.kind != "ema":
            return
        from .lora import adapter_pairs

        teacher, student_params = adapter_pairs(self.model)
        t_params = local_params(teacher)
        s_params = [p.to(t.dtype) for p, t in zip(local_params(student_params), t_params)]
        torch._foreach_lerp_(t_params, s_params, 1.0 - self.decay)
