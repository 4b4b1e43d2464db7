"""The parallel interface the trainer talks to, and its single-process implementation.

A strategy owns the wrapped student, its optimizer and the (sharded) teacher weights, and their
tensor state in a checkpoint. The trainer only asks it to run a backward (saying whether it is
the last of the optimizer step, so gradient sync can be deferred), to clip and step, to update
the EMA teacher shard by shard, and to save or load its state into a checkpoint directory that
`checkpoint.Checkpointer` prepared (and completes). This one and FSDP2 save with DCP
(`dcp_state`); DeepSpeed with its own checkpoint API.

LoRA mode: the model carries a trainable student adapter and a frozen teacher adapter on a frozen
base; `teacher_keys` names the teacher adapter's parameters, which are saved as the teacher.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import OptimConfig, ParallelConfig
from ..distributed import DistInfo
from . import dcp_state

log = logging.getLogger(__name__)


class ParallelStrategy:
    name = "none"

    def __init__(self, cfg: ParallelConfig, info: DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.model: nn.Module
        self.teacher: Optional[nn.Module] = None
        self.teacher_keys: tuple[str, ...] = ()
        self.optimizer: torch.optim.Optimizer

    # ---- set-up ------------------------------------------------------------------------------
    def setup(
        self,
        model: nn.Module,
        teacher: Optional[nn.Module],
        units: list[nn.Module],
        optim_cfg: OptimConfig,
        teacher_keys: Sequence[str] = (),
    ) -> None:
        """Wrap `model` (and the teacher copy, if any) and build the optimizer over the trainable
        parameters. `teacher_keys`: parameters of `model` that are the teacher's (LoRA mode)."""
        from ..optim import build_optimizer

        self.model = model
        self.teacher = teacher
        self.teacher_keys = tuple(teacher_keys)
        self.optimizer = build_optimizer(model, optim_cfg)

    # ---- one optimizer step ------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one roll-out step; `last` marks the final backward before the update."""
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip in place; the total norm before clipping as a 0-dim tensor on the device (no host
        sync: the trainer reads it with the step's flags, once). DeepSpeed's engine gives a float."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    # ---- teacher -------------------------------------------------------------------------------
    def local_params(self, params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors this rank owns of a module's weights, or of the given parameters (all of
        them when unsharded)."""
        return [p.data for p in iter_params(params)]

    # ---- state ---------------------------------------------------------------------------------
    def save(self, directory: Path, async_save: bool = False):
        """Write student, optimizer and teacher state into `directory` (collective).

        With `async_save`, returns the future of a background write (None when synchronous).
        """
        state = dcp_state.training_state(self.model, self.optimizer, self.teacher, self.teacher_keys)
        return dcp_state.save(state, directory, async_save, self._checkpoint_group() if async_save else None)

    def _checkpoint_group(self):
        """A separate gloo group for background checkpoint writes, so that they never interleave
        with the training collectives of the default group (created once, on every rank)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        if getattr(self, "_ckpt_group", None) is None:
            self._ckpt_group = dist.new_group(backend="gloo")
        return self._ckpt_group

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (collective); DCP reshards from another world size."""
        state = dcp_state.training_state(self.model, self.optimizer, self.teacher, self.teacher_keys)
        dcp_state.load(state, directory)
        dcp_state.apply_training_state(state, self.model, self.optimizer, self.teacher, self.teacher_keys)

    def full_state_dict(self, keys: Optional[Collection[str]] = None) -> dict[str, torch.Tensor]:
        """The student's unsharded weights on CPU (rank 0 gets them; others may get {}); with
        `keys`, only those parameters (a LoRA adapter: the base is never gathered). Collective."""
        state = self.model.state_dict()
        return {k: v.detach().cpu() for k, v in state.items() if keys is None or k in keys}

    def unwrapped(self) -> nn.Module:
        """The diffusers module (for save_pretrained configs)."""
        return self.model

    def close(self) -> None:
        """Finish what the wrapped models still have in flight (prefetches, hooks) while the
        process group is up; the strategy is not used afterwards."""


def iter_params(params: nn.Module | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    """A module's parameters, or the given ones."""
    return params.parameters() if isinstance(params, nn.Module) else params
