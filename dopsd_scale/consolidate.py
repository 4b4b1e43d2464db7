"""Offline consolidation: a checkpoint's weights in one process, without a process group.

Export, sampling and evaluation read training checkpoints on a laptop or a login node, whatever
world size wrote them. Each parallel strategy writes its tensor state in its own format:
- `none` / FSDP2: DCP shards with the entries `student`, `optimizer` and `teacher`
  (`parallel/dcp_state.py`); DCP reshards them on load, so any world size reads them;
- DeepSpeed: `deepspeed/state/` (the engine's own checkpoint) with the teacher beside it
  (`parallel/deepspeed.py`); DeepSpeed's zero-to-fp32 rebuilds the student.
This module is the reading side of both formats and names their files. It imports nothing of
dopsd_scale except the LoRA file helpers, so `checkpoint.py` (the directory layout) and the
strategies (the writing side) can both depend on it without depending on each other.

LoRA checkpoints (`model.finetune=lora`) hold adapters, not the base: `read_entry` returns an
adapter's tensors (their names carry the adapter name, e.g. `...lora_A.student.weight`), and
`load_weights` merges the adapter into a plain base model, for callers that want a whole model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

# Single-process reads use DCP without a process group on purpose.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# ---- the DeepSpeed strategy's files inside a checkpoint directory --------------------------------
DS_DIR = "deepspeed"
"""`engine.save_checkpoint` writes here (tag `TAG`)."""
TAG = "state"
TEACHER_FILE = "teacher.safetensors"
"""ZeRO-2: the replicated teacher (or the LoRA teacher adapter), written by rank 0."""
TEACHER_SHARD = "teacher_shard_{:05d}.safetensors"
"""ZeRO-3: each rank's partitions of the teacher."""
SHARD_FORMAT = "dopsd-zero3-teacher-v1"

WHICH = ("student", "teacher")


def is_deepspeed(checkpoint_dir: Path) -> bool:
    return (Path(checkpoint_dir) / DS_DIR).is_dir()


def deepspeed_world_size(checkpoint_dir: Path) -> int:
    """Ranks that wrote a DeepSpeed checkpoint (0: not one)."""
    return len(list((Path(checkpoint_dir) / DS_DIR / TAG).glob("*optim_states.pt")))


# ---- DCP (none / FSDP2) ------------------------------------------------------------------------
def read_dcp_entry(checkpoint_dir: Path, which: str) -> dict[str, torch.Tensor]:
    """Every tensor of one DCP entry (`student` / `teacher`), full and on CPU, without a model:
    the shapes come from the checkpoint's metadata (used for LoRA adapters)."""
    reader = dcp.FileSystemReader(str(checkpoint_dir))
    prefix = which + "."
    state = {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            state[key[len(prefix) :]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not state:
        raise FileNotFoundError(f"{checkpoint_dir}: no {which} weights (the run's teacher.kind is not ema?)")
    dcp.load({which: state}, checkpoint_id=str(checkpoint_dir))
    return state


def _load_dcp_into(model: nn.Module, checkpoint_dir: Path, which: str) -> None:
    state = {which: get_model_state_dict(model, options=StateDictOptions())}
    dcp.load(state, checkpoint_id=str(checkpoint_dir))
    set_model_state_dict(model, state[which])


# ---- DeepSpeed -----------------------------------------------------------------------------------
def read_deepspeed(
    checkpoint_dir: Path, which: str = "student", exclude_frozen: bool = False
) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a DeepSpeed checkpoint's student or teacher, on CPU, in one process.

    `exclude_frozen`: the checkpoint holds only the trainable parameters (LoRA adapters)."""
    checkpoint_dir = Path(checkpoint_dir)
    if which == "student":
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint_dir / DS_DIR), tag=TAG, exclude_frozen_parameters=exclude_frozen
        )
        return {
            k: v.detach().cpu().float().contiguous() if v.is_floating_point() else v.cpu() for k, v in state.items()
        }
    if which != "teacher":
        raise ValueError(f"which={which!r}: expected student or teacher")
    if (checkpoint_dir / TEACHER_FILE).is_file():
        return load_file(str(checkpoint_dir / TEACHER_FILE))
    shards = sorted(checkpoint_dir.glob("teacher_shard_*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{checkpoint_dir}: no teacher weights (the run's teacher.kind is live?)")
    return _join_teacher_shards(checkpoint_dir, shards)


def _join_teacher_shards(checkpoint_dir: Path, shards: list[Path]) -> dict[str, torch.Tensor]:
    with safe_open(str(shards[0]), "pt") as f:
        meta = f.metadata()
    if meta.get("format") != SHARD_FORMAT or int(meta["world_size"]) != len(shards):
        raise ValueError(
            f"{checkpoint_dir}: expected {meta.get('world_size')} teacher shards "
            f"of format {SHARD_FORMAT}, found {len(shards)}"
        )
    shapes = json.loads(meta["shapes"])
    parts = [load_file(str(s)) for s in shards]
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        flat = torch.cat([p[f"param/{name}"].reshape(-1) for p in parts])
        state[name] = flat[: torch.Size(shape).numel()].reshape(shape).float().contiguous()
    state.update({k[7:]: v for k, v in parts[0].items() if k.startswith("buffer/")})
    return state


# ---- either format -------------------------------------------------------------------------------
def read_entry(checkpoint_dir: Path, which: str = "student", adapters_only: bool = False) -> dict[str, torch.Tensor]:
    """The full tensors of a checkpoint's student or teacher, whichever strategy wrote it."""
    if which not in WHICH:
        raise ValueError(f"which={which!r}: expected student or teacher")
    if is_deepspeed(checkpoint_dir):
        return read_deepspeed(checkpoint_dir, which, exclude_frozen=adapters_only)
    return read_dcp_entry(checkpoint_dir, which)


def load_weights(
    model: nn.Module, checkpoint_dir: Path, which: str = "student", run_config: Optional[dict] = None
) -> None:
    """Load a checkpoint's student (or teacher) into a plain, unsharded model on CPU.

    A LoRA run's checkpoint (`run_config`: the config it recorded) holds adapters: they are
    merged into the model's (base) weights, W += alpha / r * B A.
    """
    from .lora_files import LoraFileSettings, adapter_to_peft, merge_adapter

    settings = LoraFileSettings.from_run_config(run_config or {})
    if settings is not None:
        if which == "teacher" and settings.teacher_kind != "ema":
            raise ValueError(
                f"{checkpoint_dir}: a LoRA run with teacher.kind={settings.teacher_kind} keeps no "
                "teacher adapter (frozen is the base model, live the student)"
            )
        state = adapter_to_peft(read_entry(checkpoint_dir, which, adapters_only=True), which)
        merge_adapter(model, state, settings.scale)
        return
    if is_deepspeed(checkpoint_dir):
        set_model_state_dict(model, read_deepspeed(checkpoint_dir, which))
        return
    _load_dcp_into(model, checkpoint_dir, which)
