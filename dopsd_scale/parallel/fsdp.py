"""FSDP2: `fully_shard` per transformer block (the spec names them), then the root.

The teacher copy is sharded the same way, so its EMA update is a local lerp on matching shards
and never gathers a weight. Its forward all-gathers block by block like the student's.

Gradient sync over the K per-step backwards: by default every backward reduce-scatters its
gradients into the sharded `.grad` (memory: sharded gradients only). `defer_grad_sync` skips the
reduce-scatter until the last backward of the step: one collective per step instead of K, at the
price of holding the *unsharded* gradients (a full fp32 copy of the model per rank) in between.

LoRA mode: the adapters are injected before sharding, so each block's FSDP unit holds its frozen
base weights, the trainable student adapter and the frozen teacher adapter (FSDP2 shards per
parameter and reduce-scatters only what has a gradient). There is no second model copy: the
teacher forward gathers the same units with the teacher adapter switched on, and the EMA lerps
matching local shards of the two adapters (same shapes, same placements).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..config import OptimConfig
from .base import ParallelStrategy, iter_params

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDP2Strategy(ParallelStrategy):
    name = "fsdp2"

    def _shard(self, module: nn.Module, units: list[nn.Module], reshard: bool) -> None:
        policy = MixedPrecisionPolicy(
            param_dtype=DTYPES[self.cfg.param_dtype], reduce_dtype=DTYPES[self.cfg.reduce_dtype]
        )
        kwargs = {"mp_policy": policy, "reshard_after_forward": reshard}
        if self.cfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(module, **kwargs)

    def setup(
        self,
        model: nn.Module,
        teacher: Optional[nn.Module],
        units: list[nn.Module],
        optim_cfg: OptimConfig,
        teacher_keys: Sequence[str] = (),
    ) -> None:
        from ..optim import build_optimizer

        self._shard(model, units, self.cfg.reshard_after_forward)
        if teacher is not None:
            # The teacher's units are the same submodules of its own copy, found by name.
            names = {id(m): n for n, m in model.named_modules()}
            teacher_modules = dict(teacher.named_modules())
            self._shard(teacher, [teacher_modules[names[id(u)]] for u in units], reshard=True)
        self.model, self.teacher, self.teacher_keys = model, teacher, tuple(teacher_keys)
        self.optimizer = build_optimizer(model, optim_cfg)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.cfg.defer_grad_sync:
            self.model.set_requires_gradient_sync(last)
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global norm as a plain 0-dim device tensor (an all-reduce, no host sync)."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def local_params(self, params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
        return [p.to_local() if isinstance(p, DTensor) else p.data for p in iter_params(params)]

    def full_state_dict(self, keys: Optional[Collection[str]] = None) -> dict[str, torch.Tensor]:
        if keys is None:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=options)
        # only these parameters (a LoRA adapter), gathered one by one in the same order on every rank
        named = dict(self.model.named_parameters())
        out = {}
        for key in sorted(keys):
            p = named[key]
            out[key] = (p.full_tensor() if isinstance(p, DTensor) else p.data).detach().cpu()
        return out
