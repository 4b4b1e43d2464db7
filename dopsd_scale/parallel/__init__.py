"""Parallel strategies: `none` (one process), `fsdp2`, `deepspeed` (ZeRO-2/3)."""

from __future__ import annotations

import torch

from ..config import ParallelConfig
from ..distributed import DistInfo
from .base import ParallelStrategy


def build_parallel(cfg: ParallelConfig, info: DistInfo, device: torch.device) -> ParallelStrategy:
    if cfg.kind == "none":
        if info.world_size > 1:
            raise ValueError(
                f"parallel.kind=none runs one process, but the world size is {info.world_size}: use fsdp2 or deepspeed"
            )
        return ParallelStrategy(cfg, info, device)
    if cfg.kind == "fsdp2":
        from .fsdp import FSDP2Strategy

        return FSDP2Strategy(cfg, info, device)
    if cfg.kind == "deepspeed":
        from .deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, info, device)
    raise ValueError(f"parallel.kind={cfg.kind!r}: expected none, fsdp2 or deepspeed")


__all__ = ["ParallelStrategy", "build_parallel"]
