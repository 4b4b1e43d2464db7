"""The tensor state of the `none` and FSDP2 strategies: torch.distributed.checkpoint (DCP).

One DCP checkpoint per directory with three entries:
- `student`: the student's weights. Full fine-tuning: every weight (and buffer). LoRA mode
  (the model has frozen parameters): only the trainable ones, the student adapter; the base
  never changes and is read from the model directory again.
- `optimizer`: the optimizer state, keyed by parameter names (DCP's optimizer state dict).
- `teacher`: the EMA teacher's weights: the teacher copy's, or in LoRA mode the teacher
  adapter's parameters of the same model (`teacher_keys`). Absent for live / frozen teachers.
Under FSDP2 the values are the sharded DTensors: each rank writes its shards, and DCP reshards
on load, so a checkpoint resumes on any world size. The reading side without a process group
is `dopsd_scale.consolidate`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

# Single-process runs use DCP without a process group on purpose.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _trainable_names(model: nn.Module) -> Optional[set[str]]:
    """Names of the trainable parameters, or None when all are (full fine-tuning)."""
    named = list(model.named_parameters())
    trainable = {n for n, p in named if p.requires_grad}
    return None if len(trainable) == len(named) else trainable


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, teacher: Optional[nn.Module], teacher_keys: Sequence[str] = ()
) -> dict:
    """The state dicts DCP saves or fills in place: student, optimizer and (when kept) teacher."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    trainable = _trainable_names(model)
    state = {
        "student": model_sd if trainable is None else {k: v for k, v in model_sd.items() if k in trainable},
        "optimizer": optim_sd,
    }
    if teacher is not None:
        state["teacher"] = get_model_state_dict(teacher)
    elif teacher_keys:
        state["teacher"] = {k: model_sd[k] for k in teacher_keys}
    return state


def apply_training_state(
    state: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    teacher: Optional[nn.Module],
    teacher_keys: Sequence[str] = (),
) -> None:
    """Put loaded state dicts back; a LoRA student's state covers its trainable parameters only."""
    partial = _trainable_names(model) is not None
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["student"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=not partial),
    )
    if teacher is not None:
        set_model_state_dict(teacher, state["teacher"])
    elif teacher_keys:
        set_model_state_dict(model, state["teacher"], options=StateDictOptions(strict=False))


def save(state: dict, directory: Path, async_save: bool = False, process_group=None):
    """Save `state`; with `async_save`, stage it in memory and return the write's future."""
    if async_save:
        return dcp.async_save(state, checkpoint_id=str(directory), process_group=process_group)
    dcp.save(state, checkpoint_id=str(directory))
    return None


def load(state: dict, directory: Path) -> None:
    """Fill `state` in place; DCP reshards when the world size changed since the save, and
    refuses a checkpoint that lacks any requested tensor."""
    dcp.load(state, checkpoint_id=str(directory))
