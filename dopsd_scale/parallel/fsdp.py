"""FSDP2: `fully_shard` per transformer block (the spec names them), then the root.

The teacher copy is sharded the same way, so its EMA update is a local lerp on matching shards
and never gathers a weight. Its forward all-gathers block by block like the student's.

Gradient sync over the K per-step backwards: by default every backward reduce-scatters its
gradients into the sharded `.grad` (memory: sharded gradients only). `defer_grad_sync` skips the
reduce-scatter until the last backward of the step: one collective per step instead of K, at the
price of holding the *unsharded* gradients (a full fp32 copy of the model per rank) in between.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..config import OptimConfig
from .base import ParallelStrategy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDP2Strategy(ParallelStrategy):
    name = "fsdp2"

    def _shard(self, module: nn.Module, units: list[nn.Module], reshard: bool) -> None:
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[self.cfg.param_dtype],
                                      reduce_dtype=DTYPES[self.cfg.reduce_dtype])
        kwargs = {"mp_policy": policy, "reshard_after_forward": reshard}
        if self.cfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(module, **kwargs)

    def setup(self, model: nn.Module, teacher: Optional[nn.Module], units: list[nn.Module],
              optim_cfg: OptimConfig) -> None:
        from ..optim import build_optimizer

        self._shard(model, units, self.cfg.reshard_after_forward)
        if teacher is not None:
            # The teacher's units are the same submodules of its own copy, found by name.
            names = {id(m): n for n, m in model.named_modules()}
            teacher_modules = dict(teacher.named_modules())
            self._shard(teacher, [teacher_modules[names[id(u)]] for u in units], reshard=True)
        self.model, self.teacher = model, teacher
        self.optimizer = build_optimizer(model, optim_cfg)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.cfg.defer_grad_sync:
            self.model.set_requires_gradient_sync(last)
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def local_params(self, module: nn.Module) -> list[torch.Tensor]:
        return [p.to_local() if isinstance(p, DTensor) else p.data for p in module.parameters()]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)
