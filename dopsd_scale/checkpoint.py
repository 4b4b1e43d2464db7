"""Checkpoint directories: layout, atomic completion, rank files, RNG, keep-last-N, `latest`.

Layout of `<run>/checkpoints/`:
  step_00000100/          one checkpoint
      ...                 the parallel strategy's tensor state (student, optimizer, teacher), in
                          its own format: DCP shards (none / FSDP2) or DeepSpeed's checkpoint
      rank_00000.json     this rank's step, LR schedule, data-reader position, the run's config
      rank_00000.rng.safetensors   this rank's RNG states (they differ per rank)
  latest                  name of the newest complete checkpoint (replaced atomically)

This module knows directories, not tensors: a save hands `step_X.tmp/` to `strategy.save(dir,
async_save)` and a load hands the directory to `strategy.load(dir)`. A save writes `step_X.tmp/`
first and renames it when every rank is done; only then does `latest` move. A crash mid-save
therefore leaves the previous checkpoint intact and current. Non-tensor state lives in JSON and
RNG states in safetensors: nothing here needs pickle. Reading a checkpoint's weights offline
(export, sampling) is `dopsd_scale.consolidate`'s; `load_student_weights` is its entry point.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)
LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- RNG --------------------------------------------------------------------------------
def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"] = torch.tensor([np_state[2]], dtype=torch.int64)
    py_state = random.getstate()
    state["python"] = torch.tensor(py_state[1], dtype=torch.int64)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"][0]), 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int = 3, async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending = None

    # ---- locating --------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if is_checkpoint(path) else None

    def resolve(self, resume: str) -> Optional[Path]:
        """`auto` -> latest here (or None), `none` -> None, else an explicit directory."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not is_checkpoint(path):
            raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint directory")
        return path

    # ---- saving ----------------------------------------------------------------------------
    def save(self, step: int, strategy, extra: dict[str, Any]) -> Path:
        """Save the strategy's state plus this rank's JSON `extra` and RNG state; collective.

        With `async_save` the tensors are staged in memory and written in the background; the
        checkpoint is finalised (JSON, rename, `latest`) by :meth:`wait`, which the next save
        and the end of training call. Until then `latest` still names the previous checkpoint.
        """
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        future = strategy.save(tmp, async_save=self.async_save)
        self._pending = (future, tmp, final, extra, rng_state())
        if future is None:
            self.wait()
        return final

    def wait(self) -> Optional[Path]:
        """Finish the pending save (if any): this rank's JSON and RNG, then rename; collective."""
        if self._pending is None:
            return None
        future, tmp, final, extra, rng = self._pending
        self._pending = None
        if future is not None:
            future.result()
        rank = _rank()
        save_file(rng, str(tmp / f"rank_{rank:05d}.rng.safetensors"))
        # the rank JSON is what marks a checkpoint complete, so it is written last
        (tmp / f"rank_{rank:05d}.json").write_text(json.dumps(extra, indent=1), encoding="utf-8")
        _barrier()
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._point_latest(final.name)
            self._prune()
        _barrier()
        return final

    def _point_latest(self, name: str) -> None:
        tmp = self.root / (LATEST + ".tmp")
        tmp.write_text(name)
        os.replace(tmp, self.root / LATEST)

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- loading ---------------------------------------------------------------------------
    def data_states(self, path: Path, key: str = "data") -> list[dict]:
        """The data-reader states (`data`, or `anchor_data`) of every rank that wrote the checkpoint."""
        states = [json.loads(p.read_text(encoding="utf-8")).get(key) for p in _rank_files(path)]
        return [s for s in states if s]

    def load(self, path: Path, strategy) -> dict[str, Any]:
        """Restore the strategy's state; return this rank's JSON extra and restore its RNG."""
        strategy.load(path)
        rank = _rank()
        extra_path = path / f"rank_{rank:05d}.json"
        if not extra_path.is_file():  # resumed on more ranks than saved: take rank 0's scalars
            extra = json.loads((path / "rank_00000.json").read_text(encoding="utf-8"))
            extra["data"] = None
            return extra
        rng_path = path / f"rank_{rank:05d}.rng.safetensors"
        if rng_path.is_file():
            set_rng_state(load_file(str(rng_path)))
        return json.loads(extra_path.read_text(encoding="utf-8"))


def _rank_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("rank_*[0-9].json"))


def is_checkpoint(path: Path) -> bool:
    """Complete checkpoints have rank 0's JSON, written after all state (FSDP2 or DeepSpeed)."""
    return (Path(path) / "rank_00000.json").is_file()


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint directory, or a run's `checkpoints/` folder (follow its `latest` pointer)."""
    path = Path(checkpoint)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint directory")
    return path


def run_config(path: Path) -> dict:
    """The config the run that wrote a checkpoint recorded (in rank 0's JSON)."""
    return json.loads((Path(path) / "rank_00000.json").read_text(encoding="utf-8")).get("config") or {}


def load_student_weights(model: nn.Module, checkpoint: str | Path, which: str = "student") -> None:
    """Load a checkpoint's student (or teacher) weights into a plain, unsharded model on CPU.

    Works for any world size and both back-ends, without a process group (see
    `dopsd_scale.consolidate`); a LoRA run's adapter is merged into the model's base weights.
    """
    from .consolidate import load_weights

    path = resolve_checkpoint(checkpoint)
    load_weights(model, path, which, run_config(path))
