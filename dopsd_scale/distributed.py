"""Process-group set-up shared by torchrun, Ray Train workers and single-process runs."""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Join the process group torchrun or Ray prepared (or none); one place decides the backend."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown_distributed(clean: bool = True) -> None:
    """Tear down the process groups this process joined (the launcher's job, not Ray's workers').

    Without it gloo's worker threads outlive the interpreter and can abort the process at exit
    ("terminate called without an active exception"). After a clean run every rank first waits
    for the others, so that none leaves while another is still in a collective.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    gc.collect()  # drop finished work objects and the tensors they hold while Python is still whole
    dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over ranks of a few scalars (one collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_max_tensor(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks of a small device tensor, brought to the host (one sync)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu()


class RankPrefixFilter(logging.Filter):
    """Prefix every record with the rank so interleaved logs stay readable."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "rank_prefixed", False):  # several handlers see the same record
            record.msg = f"[rank {self.rank}] {record.msg}"
            record.rank_prefixed = True
        return True


def configure_rank_logging(info: DistInfo) -> None:
    """Rank 0 logs everything; other ranks only warnings and errors, prefixed with their rank."""
    root = logging.getLogger()
    if info.world_size > 1:
        for handler in root.handlers:
            if not any(isinstance(f, RankPrefixFilter) for f in handler.filters):
                handler.addFilter(RankPrefixFilter(info.rank))
        if not info.is_main:
            logging.getLogger("dopsd_scale").setLevel(logging.WARNING)
