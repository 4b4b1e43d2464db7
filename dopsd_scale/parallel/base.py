"""The parallel interface the trainer talks to, and its single-process implementation.

A strategy owns the wrapped student, its optimizer and the (sharded) teacher weights. The trainer
only asks it to run a backward (saying whether it is the last of the optimizer step, so gradient
sync can be deferred), to clip and step, to update the EMA teacher shard by shard, and to save or
load the training state into a checkpoint directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import OptimConfig, ParallelConfig
from ..distributed import DistInfo

log = logging.getLogger(__name__)


class ParallelStrategy:
    name = "none"

    def __init__(self, cfg: ParallelConfig, info: DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.model: nn.Module
        self.teacher: Optional[nn.Module] = None
        self.optimizer: torch.optim.Optimizer

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self, model: nn.Module, teacher: Optional[nn.Module], units: list[nn.Module],
              optim_cfg: OptimConfig) -> None:
        """Wrap `model` (and the teacher copy, if any) and build the optimizer."""
        from ..optim import build_optimizer

        self.model = model
        self.teacher = teacher
        self.optimizer = build_optimizer(model, optim_cfg)

    # ---- one optimizer step ------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one roll-out step; `last` marks the final backward before the update."""
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def optimizer_step(self) -> None:
        self.optimizer.step()

    # ---- teacher -------------------------------------------------------------------------------
    def local_params(self, module: nn.Module) -> list[torch.Tensor]:
        """The tensors this rank owns of `module`'s weights (all of them when unsharded)."""
        return [p.data for p in module.parameters()]

    # ---- state ---------------------------------------------------------------------------------
    def save(self, directory: Path, async_save: bool = False):
        """Write student, optimizer and teacher state into `directory` (collective).

        With `async_save`, returns the future of a background write (None when synchronous).
        """
        from ..checkpoint import dcp_save, training_state

        state = training_state(self.model, self.optimizer, self.teacher)
        return dcp_save(state, directory, async_save, self._checkpoint_group() if async_save else None)

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
        from ..checkpoint import apply_training_state, dcp_load, training_state

        state = training_state(self.model, self.optimizer, self.teacher)
        dcp_load(state, directory)
        apply_training_state(state, self.model, self.optimizer, self.teacher)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's unsharded weights on CPU (rank 0 gets them; others may get {})."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def unwrapped(self) -> nn.Module:
        """The diffusers module (for save_pretrained configs)."""
        return self.model

    def close(self) -> None:
        """Finish what the wrapped models still have in flight (prefetches, hooks) while the
        process group is up; the strategy is not used afterwards."""
