"""DeepSpeed ZeRO-2 / ZeRO-3: the student is a DeepSpeed engine, checkpoints are DeepSpeed's own.

The DeepSpeed config is generated from ours (`ds_config`): ZeRO stage, optimizer (and for stage 3
parameter) offload to CPU, bf16, gradient clipping from `optim.grad_clip`, and
`gradient_accumulation_steps = 1`: we never use the engine's data loader or micro-batch counting;
the trainer says which backward is the last of an optimizer step instead.

One optimizer step, as the trainer drives it:
- `backward(loss, last)` x K: `engine.set_gradient_accumulation_boundary(last)` then
  `engine.backward(loss, scale_wrt_gas=False)`. ZeRO-2/3 reduce-scatter each backward's gradients
  into the rank's fp32 gradient partition and add them up there (sharded gradient memory); the
  boundary backward hands the accumulated partition to the optimizer. With
  `parallel.defer_grad_sync=true` the K backwards run inside `engine.coalesce_grad_reduction()`
  instead: gradients stay unsharded and local until the last backward, which reduces once
  (one collective per step, at the price of a full gradient copy per rank, like FSDP2's option).
- `clip_grad_norm()` computes the global norm of the accumulated gradient partitions before the
  step (the trainer decides there whether to skip it; `engine.get_global_grad_norm()` only exists
  after `step()`). ZeRO-2: the ZeRO optimizer's `scaled_global_norm()`, the function its `step()`
  uses (one scalar all-reduce; its "invalid norm" sentinel -1 comes back as NaN, so the trainer
  skips the step). ZeRO-3: the public `safe_get_local_grad` of every partition, squared and
  summed, one all-reduce. (ZeRO-2 has no public per-partition access: `safe_get_full_grad`
  all-reduces every whole gradient, a second gradient all-reduce per step.) DeepSpeed clips by
  itself in `step()` (`gradient_clipping` in its config), so the norm is computed twice per step;
  both are cheap next to the K forward/backward passes.
- `optimizer_step()` -> `engine.step()`. `zero_grad()` after a skipped step drops the pending
  gradient partitions the way DeepSpeed drops them on an overflow. DeepSpeed has no public call
  for that (its `zero_grad` keeps the reduced partitions, and a skipped step would add them to
  the next one), so it uses the ZeRO optimizers' internal clean-up, as their `step()` does.

The learning rate: `self.optimizer` is the torch AdamW handed to DeepSpeed, which DeepSpeed's ZeRO
optimizer wraps and steps on the fp32 master partitions; the trainer's LambdaLR writes its
`param_groups[i]["lr"]`, which are the groups DeepSpeed's `step()` applies.

The EMA teacher is sharded like the student:
- ZeRO-2: a plain replicated copy (ZeRO-2 replicates the student's compute weights too);
  `local_params` is every whole weight.
- ZeRO-3: a second DeepSpeed engine without optimizer (DeepSpeed's parameter partitioning and
  gather-on-forward); `local_params` is each parameter's partition `p.ds_tensor`, which has the
  same layout for student and teacher (the student's are read from its fp32 master partitions
  through the public `safe_get_local_fp32_param`),
  so the EMA runs shard by shard without a gather. The teacher never keeps gathered
  ("persistent") weights between forwards, so a forward always sees the latest EMA shards.
The teacher stays in fp32 when the student computes in bf16, so an EMA with decay 0.9999 is not
rounded away (bf16 keeps about 3 significant digits); its forward then runs in fp32 (bf16 matmuls
under the trainer's autocast, `run.mixed_precision`). Under ZeRO-2 the EMA reads the student's
bf16 compute weights (its fp32 masters are partitioned across ranks by a flat layout).

LoRA mode (ZeRO-2 only): the engine wraps the model with both adapters on the frozen base; the
optimizer (and ZeRO's flat fp32 partitions) hold the student adapter only, which is trainable when
`deepspeed.initialize` runs (ZeRO registers gradient hooks then). A bf16 engine casts every
parameter to bf16, the teacher adapter included: it is cast back to fp32 right after, so its EMA
is not rounded away (the LoRA forward casts its input to the adapter's dtype and back).

Checkpoints: `<ckpt>/deepspeed/state/` is `engine.save_checkpoint` (student, optimizer state and
fp32 master partitions; exact resume on the same world size; in LoRA mode without the frozen
base and teacher adapter). The teacher goes beside it: `teacher.safetensors` (ZeRO-2, written by
rank 0: the teacher copy or the teacher adapter) or `teacher_shard_<rank>.safetensors` (ZeRO-3,
each rank's partitions). `dopsd_scale.consolidate` reads either back offline (the file names are
defined there, with the reading side).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import OptimConfig, ParallelConfig
from ..consolidate import DS_DIR, SHARD_FORMAT, TAG, TEACHER_FILE, TEACHER_SHARD, deepspeed_world_size
from ..distributed import DistInfo
from .base import ParallelStrategy, iter_params

log = logging.getLogger(__name__)

COMM_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def ds_config(cfg: ParallelConfig, optim_cfg: OptimConfig, num_params: int, teacher: bool = False) -> dict:
    """The DeepSpeed config dict of the student engine (or, `teacher=True`, of the ZeRO-3 teacher).

    Reduce and all-gather buckets are DeepSpeed's default 5e8 elements, capped at the model's size:
    DeepSpeed allocates whole buckets, which cost seconds per step on a small model.
    """
    if cfg.zero_stage not in (2, 3):
        raise ValueError(f"parallel.zero_stage={cfg.zero_stage}: DeepSpeed runs ZeRO stage 2 or 3")
    if cfg.param_dtype not in ("float32", "bfloat16"):
        raise ValueError(
            f"parallel.param_dtype={cfg.param_dtype!r}: DeepSpeed runs float32 or bfloat16 "
            "(float16 would need loss scaling)"
        )
    offload = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    bucket = int(min(5e8, max(num_params, 1)))
    zero: dict = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": False,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if cfg.cpu_offload and cfg.zero_stage == 3:
        zero["offload_param"] = dict(offload)
    if teacher:
        # gather-on-forward from the EMA shards every time: no weights kept gathered between forwards
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
        return {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
    if cfg.cpu_offload:
        zero["offload_optimizer"] = dict(offload)
    config = {
        # we never use the engine's data loader: the batch size only feeds DeepSpeed's own counters
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(optim_cfg.grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.param_dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if cfg.param_dtype == "bfloat16":
        # the K per-step gradients are summed in fp32, and reduced in parallel.reduce_dtype
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = COMM_DTYPES[cfg.reduce_dtype]
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_process_group(info: DistInfo) -> None:
    """DeepSpeed needs a process group; a single-process run gets a private one-rank group.

    DeepSpeed also reads the launcher's variables (LOCAL_RANK...), which not every launcher sets.
    """
    env = {"RANK": str(info.rank), "LOCAL_RANK": str(info.local_rank), "WORLD_SIZE": str(info.world_size)}
    if not dist.is_initialized():
        if info.world_size > 1:
            raise RuntimeError("parallel.kind=deepspeed on several ranks needs the process group up first")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=0, world_size=1)


def _state_keys(module: nn.Module) -> tuple[list[str], list[str]]:
    """(parameter names, persistent buffer names) in state_dict order."""
    params = dict(module.named_parameters(remove_duplicate=False))
    keys = list(module.state_dict().keys())
    return [k for k in keys if k in params], [k for k in keys if k not in params]


class DeepSpeedStrategy(ParallelStrategy):
    name = "deepspeed"

    def __init__(self, cfg: ParallelConfig, info: DistInfo, device: torch.device):
        super().__init__(cfg, info, device)
        if cfg.zero_stage not in (2, 3):
            raise ValueError(f"parallel.zero_stage={cfg.zero_stage}: DeepSpeed runs ZeRO stage 2 or 3")
        self.stage = cfg.zero_stage
        self.engine = None
        self._pending = False  # gradients accumulated since the last optimizer step
        self._coalesce = None  # the open coalesce_grad_reduction() context (defer_grad_sync)
        self._clip = 0.0

    # ---- set-up ------------------------------------------------------------------------------
    def setup(
        self,
        model: nn.Module,
        teacher: Optional[nn.Module],
        units: list[nn.Module],
        optim_cfg: OptimConfig,
        teacher_keys: Sequence[str] = (),
    ) -> None:
        import deepspeed

        from ..optim import build_optimizer

        _ensure_process_group(self.info)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        optimizer = build_optimizer(model, optim_cfg)
        num_params = sum(p.numel() for p in model.parameters())
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(self.cfg, optim_cfg, num_params)
        )
        self._clip = float(optim_cfg.grad_clip or 0.0)
        self.teacher_keys = tuple(teacher_keys)
        if self.teacher_keys and self.stage != 2:
            raise ValueError("LoRA mode runs under DeepSpeed ZeRO-2 only (parallel.zero_stage=2)")
        self._recast_teacher_adapter(model)
        # The engine is called like the module (spec.velocity reads its parameters' dtype).
        self.model = self.engine
        # DeepSpeed's ZeRO optimizer steps this AdamW on the fp32 master partitions: its
        # param_groups carry the LR that the trainer's schedule sets.
        self.optimizer = optimizer
        if teacher is None:
            self.teacher = None
        elif self.stage == 3:
            config = ds_config(self.cfg, optim_cfg, num_params, teacher=True)
            self.teacher, _, _, _ = deepspeed.initialize(model=teacher.requires_grad_(False), config=config)
            self.teacher.eval()
        else:
            self.teacher = teacher.to(self.device)
        kind = "none" if teacher is None else ("partitioned" if self.stage == 3 else "replicated")
        log.info(
            "DeepSpeed ZeRO-%d: %s, cpu_offload=%s, teacher %s",
            self.stage,
            self.cfg.param_dtype,
            self.cfg.cpu_offload,
            kind,
        )

    @torch.no_grad()
    def _recast_teacher_adapter(self, model: nn.Module) -> None:
        """The engine cast every parameter to its compute dtype; the LoRA teacher adapter (an EMA)
        goes back to fp32. The parameter objects stay, only their data changes."""
        named = dict(model.named_parameters())
        for key in self.teacher_keys:
            named[key].data = named[key].data.float()

    def unwrapped(self) -> nn.Module:
        return self.engine.module

    def close(self) -> None:
        """Wait for any ZeRO-3 prefetch still in flight, release gathered weights and remove the
        engines' hooks while the process group is up, so that nothing of DeepSpeed's touches
        a collective during interpreter shutdown."""
        from deepspeed import DeepSpeedEngine

        for engine in (self.engine, self.teacher):
            if isinstance(engine, DeepSpeedEngine):
                if self.stage == 3:
                    engine.empty_partition_cache()
                engine.destroy()

    # ---- one optimizer step ------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, last: bool) -> None:
        engine = self.engine
        if self.cfg.defer_grad_sync:
            if self._coalesce is None:
                self._coalesce = engine.coalesce_grad_reduction()
                self._coalesce.__enter__()
            engine.backward(loss, scale_wrt_gas=False)
            if last:
                coalesce, self._coalesce = self._coalesce, None
                coalesce.__exit__(None, None, None)  # the one reduction of this step
        else:
            engine.set_gradient_accumulation_boundary(last)
            engine.backward(loss, scale_wrt_gas=False)
        self._pending = True

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global norm of the accumulated gradients (DeepSpeed clips to it in `step()`)."""
        if max_norm != (self._clip or float("inf")):
            raise ValueError(f"DeepSpeed clips to optim.grad_clip={self._clip} (its config), not {max_norm}")
        opt = self.engine.optimizer
        if self.stage == 3:
            norm = self._zero3_grad_norm()
        else:
            norm = float(opt.scaled_global_norm())
        # DeepSpeed reports an inf/NaN norm as -1
        return float("nan") if norm < 0 or not math.isfinite(norm) else norm / float(opt.loss_scale)

    def _zero3_grad_norm(self) -> float:
        """sqrt(sum over ranks of the squared local gradient partitions): one all-reduce."""
        from deepspeed.utils import safe_get_local_grad

        grads = [safe_get_local_grad(p) for p in self.engine.module.parameters() if p.requires_grad]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            if g is not None:
                total += g.to(self.device).double().norm(2) ** 2
        dist.all_reduce(total)
        return float(total.sqrt())

    def optimizer_step(self) -> None:
        self.engine.step()
        self._pending = False

    def zero_grad(self) -> None:
        """DeepSpeed clears gradients in `step()`; after a skipped step, drop what is pending."""
        if self._coalesce is not None:  # a step abandoned between its backwards
            coalesce, self._coalesce = self._coalesce, None
            coalesce.__exit__(None, None, None)
        if not self._pending:
            return
        # No public DeepSpeed call drops reduced gradient partitions: this is what the ZeRO optimizers do
        # on an overflow. Measured: `engine.zero_grad()` alone puts ZeRO-3's next step off (its stale
        # partitions are added); ZeRO-2 passed the tests with it, but with optimizer offload its CPU
        # accumulation keys on the micro-step counter that only step() resets.
        opt = self.engine.optimizer
        if self.stage == 3:
            opt._overflow_clean_up(opt.loss_scale)  # zero_grad (micro step 0) and drop the partitions
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            opt.zero_grad(set_to_none=True)
            opt._release_preflattened_grad_buffers()
            if opt.cpu_offload:
                opt.reset_cpu_buffers()
            else:
                for k in opt.averaged_gradients:
                    opt.averaged_gradients[k] = None
                    opt.all_grad_tensors[k] = None
            opt.micro_step_id = INITIAL_MICRO_STEP_ID
        self._pending = False

    # ---- teacher -------------------------------------------------------------------------------
    def local_params(self, params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """ZeRO-3: this rank's partition of each weight; the student's from its fp32 masters.

        The student's fp32 master partition of a parameter has the layout of its `ds_tensor`
        (DeepSpeed flattens the partitions of a group in order), so it pairs with the teacher's
        `ds_tensor` element for element, and a bf16 run's EMA is taken of the fp32 weights.
        ZeRO-2: whole (replicated) weights; a bf16 run's student weights are its bf16 copy.
        """
        if self.stage != 3:
            return [p.data for p in iter_params(params)]
        if params is not self.engine:
            return [p.ds_tensor.data for p in iter_params(params)]
        from deepspeed.utils import safe_get_local_fp32_param

        return [safe_get_local_fp32_param(p) if p.requires_grad else p.ds_tensor.data for p in params.parameters()]

    # ---- state ---------------------------------------------------------------------------------
    def save(self, directory: Path, async_save: bool = False) -> None:
        """DeepSpeed's own checkpoint API; always synchronous (`checkpoint.async_save` is ignored)."""
        directory = Path(directory)
        # LoRA: the frozen base (and the frozen teacher adapter, saved below) stays out
        self.engine.save_checkpoint(str(directory / DS_DIR), tag=TAG, exclude_frozen_parameters=self._partial)
        if self.teacher is not None or self.teacher_keys:
            self._save_teacher(directory)
        dist.barrier()
        return None

    @property
    def _partial(self) -> bool:
        """Whether the student has frozen parameters (LoRA: the base and the teacher adapter)."""
        return any(not p.requires_grad for p in self.engine.module.parameters())

    def _teacher_state(self) -> dict[str, torch.Tensor]:
        """The replicated (ZeRO-2) teacher's weights: its own copy, or the teacher adapter."""
        if self.teacher is not None:
            return self.teacher.state_dict()
        named = dict(self.engine.module.named_parameters())
        return {k: named[k] for k in self.teacher_keys}

    def _save_teacher(self, directory: Path) -> None:
        if self.stage == 2:
            if self.info.is_main:
                state = {
                    k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                    for k, v in self._teacher_state().items()
                }
                save_file(state, str(directory / TEACHER_FILE))
            return
        module = self.teacher.module
        params, buffers = _state_keys(module)
        named = dict(module.named_parameters(remove_duplicate=False))
        tensors = {f"param/{k}": named[k].ds_tensor.detach().cpu().clone() for k in params}
        if self.info.is_main:
            state = module.state_dict()
            tensors.update({f"buffer/{k}": state[k].detach().cpu().clone() for k in buffers})
        meta = {
            "format": SHARD_FORMAT,
            "world_size": str(dist.get_world_size()),
            "rank": str(dist.get_rank()),
            "shapes": json.dumps({k: list(named[k].ds_shape) for k in params}),
        }
        save_file(tensors, str(directory / TEACHER_SHARD.format(dist.get_rank())), metadata=meta)

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        saved = deepspeed_world_size(directory)
        if saved == 0:
            raise FileNotFoundError(
                f"{directory}: not a DeepSpeed checkpoint (no {DS_DIR}/{TAG}/*optim_states.pt); "
                "resume it with the parallel.kind that wrote it"
            )
        if saved != dist.get_world_size():
            raise ValueError(
                f"{directory}: a DeepSpeed checkpoint of {saved} rank(s) resumes on the same world size "
                f"only (now {dist.get_world_size()}); export it (dopsd export) or convert it with "
                "DeepSpeed's universal checkpoint tools to change the world size"
            )
        load_path, _ = self.engine.load_checkpoint(
            str(directory / DS_DIR),
            tag=TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=not self._partial,
        )
        if load_path is None:
            raise FileNotFoundError(f"{directory / DS_DIR}: DeepSpeed found no checkpoint to load")
        if self.teacher is not None or self.teacher_keys:
            self._load_teacher(directory)
        self._pending = False

    @torch.no_grad()
    def _load_teacher(self, directory: Path) -> None:
        if self.stage == 2:
            state = load_file(str(directory / TEACHER_FILE), device=str(self.device))
            if self.teacher is not None:
                self.teacher.load_state_dict(state)
                return
            named = dict(self.engine.module.named_parameters())
            if set(state) != set(self.teacher_keys):
                raise ValueError(f"{directory / TEACHER_FILE}: not this model's LoRA teacher adapter")
            for key, value in state.items():
                named[key].data.copy_(value)
            return
        module = self.teacher.module
        shard = load_file(str(directory / TEACHER_SHARD.format(dist.get_rank())))
        for name, p in module.named_parameters():
            p.ds_tensor.data.copy_(shard[f"param/{name}"])
        buffers = dict(module.named_buffers())
        for key, value in load_file(str(directory / TEACHER_SHARD.format(0))).items():
            if key.startswith("buffer/") and key[7:] in buffers:
                buffers[key[7:]].copy_(value)

    def full_state_dict(self, keys: Optional[Collection[str]] = None) -> dict[str, torch.Tensor]:
        """The student's fp32 master weights, gathered one parameter at a time (collective);
        with `keys`, only those trainable parameters (a LoRA adapter)."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        params, buffers = _state_keys(module)
        if keys is not None:
            params, buffers = [k for k in params if k in keys], []
        named = dict(module.named_parameters(remove_duplicate=False))
        out: dict[str, torch.Tensor] = {}
        for key in params:
            full = safe_get_full_fp32_param(named[key])
            if self.info.is_main:
                out[key] = full.detach().to("cpu", torch.float32).clone()
        if self.info.is_main:
            state = module.state_dict()
            out.update({k: state[k].detach().cpu().clone() for k in buffers})
        return out
