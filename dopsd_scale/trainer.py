"""The D-OPSD trainer: small `build_*` functions, one `train_step`, and the loop around it.

The trainer is written for one rank. The same object runs in a single process, under torchrun,
and inside a Ray Train worker; what differs is only how the model is wrapped for parallelism.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import Checkpointer, apply_training_state, training_state
from .config import Config, DataConfig, ModelConfig, ObjectiveConfig, RunConfig, save_config, to_dict
from .data.format import Manifest, find_val_prompts, load_val_prompts
from .data.reader import Batch, FeatureLoader, build_loader
from .flow import schedule
from .metrics import MetricsLogger, Throughput, device_peak_tflops
from .models import ModelSpec, get_spec
from .objectives import DOPSDObjective, SFTObjective
from .objectives.dopsd import RolloutStats
from .optim import build_lr_schedule, build_optimizer
from .teacher import Teacher
from .validation import save_grid, validation_grid

log = logging.getLogger(__name__)


# ---- builders -----------------------------------------------------------------------------
def build_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible")
        index = dist.get_rank() % torch.cuda.device_count() if dist.is_initialized() else 0
        return torch.device("cuda", index)
    return torch.device("cpu")


def build_autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    wants_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    if wants_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(spec: ModelSpec, cfg: ModelConfig, device: torch.device) -> nn.Module:
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model = spec.load_transformer(dtype).to(device)
    if cfg.attention_backend != "native" and hasattr(model, "set_attention_backend"):
        model.set_attention_backend(cfg.attention_backend)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def build_objective(cfg: ObjectiveConfig, spec: ModelSpec):
    sigmas = schedule(cfg.sigmas if cfg.sigmas is not None else spec.train_sigmas(cfg.num_steps))
    if cfg.kind == "sft":
        return SFTObjective(sigmas, weight=cfg.loss_weight)
    return DOPSDObjective(sigmas, cfg.space, cfg.steps, cfg.per_step_backward, cfg.loss_weight)


def build_data(cfg: DataConfig, feature_dim: int, seed: int, rank: int, world_size: int) -> FeatureLoader:
    return build_loader(cfg.path, cfg.batch_size, feature_dim, cfg.num_workers, cfg.shuffle_buffer,
                        seed, rank, world_size)


def feature_dim_of(model: nn.Module) -> int:
    return int(model.config.cap_feat_dim)


# ---- the trainer --------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.run_dir = Path(cfg.run.output_dir)
        torch.manual_seed(cfg.run.seed)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device = build_device(cfg.run)
        self.autocast = build_autocast(cfg.run, self.device)
        self.spec = get_spec(cfg.model.name, cfg.model.path)
        self.model = build_model(self.spec, cfg.model, self.device)
        self.teacher = Teacher(self.model, cfg.teacher.kind, cfg.teacher.ema_decay)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.lr_schedule = build_lr_schedule(self.optimizer, cfg.optim, cfg.run.max_steps)
        self.objective = build_objective(cfg.objective, self.spec)
        self.loader = build_data(cfg.data, feature_dim_of(self.model), cfg.data.seed, rank, world_size)
        self.manifest = Manifest.load(cfg.data.path)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        self.metrics = MetricsLogger(self.run_dir, cfg.metrics.tensorboard, enabled=rank == 0)
        self.throughput = Throughput()
        self.peak_tflops = device_peak_tflops(self.device, cfg.metrics.peak_tflops)
        self.step = 0
        self.skipped_nonfinite = 0

    # ---- one optimizer step ----------------------------------------------------------------
    def _velocity_fn(self, model: nn.Module, cond):
        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with self.autocast:
                return self.spec.velocity(model, x, sigma, cond)

        return velocity

    def _noise(self, batch: Batch) -> tuple[torch.Tensor, torch.Generator]:
        """Noise from a generator keyed by (seed, step, rank): resumes replay it exactly."""
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + self.step * 4_099 + self.rank)
        shape = self.spec.latent_shape(*batch.bucket)
        return torch.randn((len(batch), *shape), generator=gen).to(self.device), gen

    def train_step(self, batch: Batch) -> tuple[RolloutStats, float]:
        """Roll out, back-propagate, clip, step, update the teacher. Returns (stats, grad norm)."""
        self.optimizer.zero_grad(set_to_none=True)
        noise, gen = self._noise(batch)
        student = self._velocity_fn(self.model, batch.student)
        if isinstance(self.objective, SFTObjective):
            stats = self.objective(student, batch.latents, noise, generator=gen)
        else:
            teacher = self._velocity_fn(self.teacher.module, batch.teacher)
            stats = self.objective(student, teacher, noise, generator=gen)
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not torch.isfinite(torch.tensor([stats.loss, grad_norm])).all():
            self.skipped_nonfinite += 1
            log.warning("step %d: non-finite loss or gradient, update skipped", self.step)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.teacher.update(self.model)
        self.lr_schedule.step()
        return stats, grad_norm

    def step_flops(self, batch: Batch, stats: RolloutStats) -> float:
        """Model FLOPs of the step: forward = F, forward+backward = 3F, per sample."""
        shape = self.spec.latent_shape(*batch.bucket)
        f_s = self.spec.flops_per_forward(self.model, shape, int(batch.student.lengths.float().mean()))
        f_t = self.spec.flops_per_forward(self.model, shape, int(batch.teacher.lengths.float().mean()))
        trained = sum(1 for v in stats.loss_per_step if v is not None)
        untrained = stats.student_forwards - trained
        return len(batch) * (3 * f_s * trained + f_s * untrained + f_t * stats.teacher_forwards)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        self.resume()
        if self.step == 0 and self.rank == 0:
            log.info("training %s from %s for %d steps", cfg.model.name, cfg.model.path, cfg.run.max_steps)
        while self.step < cfg.run.max_steps:
            t0 = time.perf_counter()
            batch = next(self.loader).to(self.device)
            wait = time.perf_counter() - t0
            stats, grad_norm = self.train_step(batch)
            self.step += 1
            self.throughput.add(len(batch) * self.world_size, self.step_flops(batch, stats) * self.world_size, wait)
            if self.step % cfg.metrics.log_every == 0 or self.step == cfg.run.max_steps:
                self.log_metrics(stats, grad_norm)
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
            if cfg.metrics.val_every > 0 and self.step % cfg.metrics.val_every == 0:
                self.validate()
        self.finish()

    def finish(self) -> None:
        cfg = self.cfg
        if cfg.checkpoint.save_final and self.checkpointer.latest() != self._step_path():
            self.save()
        if cfg.metrics.val_every >= 0:
            self.validate()
        if cfg.checkpoint.export_final and self.rank == 0:
            self.export(self.run_dir / "export")
        self.metrics.close()

    def log_metrics(self, stats: RolloutStats, grad_norm: float) -> None:
        record: dict[str, Any] = {
            "loss": stats.loss,
            "grad_norm": grad_norm,
            "lr": self.lr_schedule.get_last_lr()[0],
            "skipped_nonfinite": self.skipped_nonfinite,
            "epoch_batches": self.loader.consumed,
        }
        for k, (loss, gap) in enumerate(zip(stats.loss_per_step, stats.gap_per_step)):
            if loss is not None:
                record[f"loss_step_{k}"] = loss
            if gap is not None:
                record[f"gap_step_{k}"] = gap
        gaps = [g for g in stats.gap_per_step if g is not None]
        if gaps:
            record["teacher_student_gap"] = sum(gaps) / len(gaps)
        record.update(self.throughput.report(self.peak_tflops))
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.log(self.step, record)
        if self.rank == 0:
            log.info("step %d loss %.5f gap %.5f grad %.3f %.2f samples/s", self.step, stats.loss,
                     record.get("teacher_student_gap", float("nan")), grad_norm, record["samples_per_s"])

    # ---- checkpoints ---------------------------------------------------------------------------
    def _step_path(self) -> Path:
        return self.checkpointer.root / f"step_{self.step:08d}"

    def _tensor_state(self) -> dict:
        teacher = self.teacher.module if self.teacher.owns_weights else None
        return training_state(self.model, self.optimizer, teacher)

    def save(self) -> Path:
        extra = {
            "step": self.step,
            "lr_schedule": {"last_epoch": self.lr_schedule.last_epoch},
            "data": self.loader.state_dict(),
            "skipped_nonfinite": self.skipped_nonfinite,
            "world_size": self.world_size,
            "config": to_dict(self.cfg),
        }
        path = self.checkpointer.save(self.step, self._tensor_state(), extra)
        log.info("saved checkpoint %s", path)
        return path

    def resume(self) -> bool:
        path = self.checkpointer.resolve(self.cfg.checkpoint.resume)
        if path is None:
            return False
        state = self._tensor_state()
        extra = self.checkpointer.load(path, state)
        teacher = self.teacher.module if self.teacher.owns_weights else None
        apply_training_state(state, self.model, self.optimizer, teacher)
        self.step = int(extra["step"])
        self.lr_schedule.last_epoch = int(extra["lr_schedule"]["last_epoch"])
        self.lr_schedule._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.skipped_nonfinite = int(extra.get("skipped_nonfinite", 0))
        if extra.get("data"):
            self.loader.load_state_dict(extra["data"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ---- validation and export -----------------------------------------------------------------
    def validation_size(self) -> tuple[int, int]:
        m = self.cfg.metrics
        if m.val_height and m.val_width:
            return m.val_height, m.val_width
        buckets = self.manifest.producer.get("buckets") or [[self.spec.default_size] * 2]
        return tuple(buckets[0])

    def validate(self) -> Optional[Path]:
        path = find_val_prompts(self.cfg.data.path, self.cfg.data.val_features)
        if path is None or self.rank != 0:
            return None
        _, feats = load_val_prompts(path)
        vae = self.spec.load_vae()
        vae = vae.to(self.device) if vae is not None else None
        height, width = self.validation_size()
        with self.autocast:
            grid = validation_grid(self.spec, self.model, vae, feats, height, width, self.cfg.metrics.val_steps,
                                   self.cfg.metrics.val_seed, self.device)
        out = save_grid(grid, self.run_dir, self.step)
        log.info("validation grid %s", out)
        return out

    def export(self, out_dir: Path) -> Path:
        target = self.spec.export(self.model, out_dir)
        log.info("exported %s", target)
        return target
