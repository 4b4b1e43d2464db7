"""The D-OPSD trainer: small `build_*` functions, one `train_step`, and the loop around it.

The trainer is written for one rank. The same object runs in a single process, under torchrun,
and inside a Ray Train worker; the parallel strategy (none, FSDP2, DeepSpeed) decides how the
student, its optimizer and the teacher are sharded. Ray is an orchestrator, not a dependency.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .attention import apply_attention_backend, resolve_backend
from .checkpoint import Checkpointer
from .config import Config, DataConfig, ModelConfig, ObjectiveConfig, RunConfig, save_config, to_dict
from .data.reader import Batch, FeatureLoader, build_loader
from .distributed import DistInfo, all_reduce_max, all_reduce_mean, barrier, configure_rank_logging, init_distributed
from .faults import FaultInjector, StopRequest
from .flow import schedule
from .metrics import MetricsLogger, Throughput, device_peak_tflops
from .models import ModelSpec, get_spec
from .objectives import DOPSDObjective, SFTObjective
from .objectives.dopsd import RolloutStats
from .optim import build_lr_schedule
from .parallel import ParallelStrategy, build_parallel
from .teacher import Teacher
from .validation import run_validation

log = logging.getLogger(__name__)


class NonFiniteAbort(RuntimeError):
    pass


# ---- builders -----------------------------------------------------------------------------
def build_device(cfg: RunConfig, info: DistInfo) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible")
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def build_autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    wants_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    if wants_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(spec: ModelSpec, cfg: ModelConfig, device: torch.device) -> nn.Module:
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model = spec.load_transformer(dtype).to(device)
    apply_attention_backend(model, resolve_backend(cfg.attention_backend, device))
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def build_objective(cfg: ObjectiveConfig, spec: ModelSpec):
    sigmas = schedule(cfg.sigmas if cfg.sigmas is not None else spec.train_sigmas(cfg.num_steps))
    if cfg.kind == "sft":
        return SFTObjective(sigmas, weight=cfg.loss_weight)
    return DOPSDObjective(sigmas, cfg.space, cfg.steps, cfg.per_step_backward, cfg.loss_weight)


def build_data(cfg: DataConfig, feature_dim: int, info: DistInfo, run_dir: Path) -> FeatureLoader:
    """This rank's reader; skipped samples are listed in `<run>/data_report.jsonl`."""
    return build_loader(cfg.path, cfg.batch_size, feature_dim, cfg.num_workers, cfg.shuffle_buffer,
                        cfg.seed, info.rank, info.world_size, manifest=cfg.manifest,
                        report_path=str(run_dir / "data_report.jsonl"))


def build_student_and_teacher(spec: ModelSpec, cfg: Config, device: torch.device,
                              strategy: ParallelStrategy) -> Teacher:
    """The student and teacher copies, handed to the strategy to wrap and shard together."""
    model = build_model(spec, cfg.model, device)
    teacher = Teacher(model, cfg.teacher.kind, cfg.teacher.ema_decay)
    strategy.setup(model, teacher.module if teacher.owns_weights else None, spec.sharding_units(model), cfg.optim)
    teacher.module = strategy.teacher if teacher.owns_weights else strategy.model
    return teacher


# ---- the trainer --------------------------------------------------------------------------
class Trainer:
    """D-OPSD (or SFT) training of one model spec; use as `with Trainer(cfg) as t: t.fit()`."""

    def __init__(self, cfg: Config, on_log: Optional[Callable[[int, dict], None]] = None):
        self.cfg, self.on_log = cfg, on_log
        self.info = init_distributed()
        self.rank, self.world_size = self.info.rank, self.info.world_size
        configure_rank_logging(self.info)
        self.run_dir = Path(cfg.run.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device = build_device(cfg.run, self.info)
        self.autocast = build_autocast(cfg.run, self.device)
        self.spec = get_spec(cfg.model.name, cfg.model.path)
        self.strategy = build_parallel(cfg.parallel, self.info, self.device)
        self.teacher = build_student_and_teacher(self.spec, cfg, self.device, self.strategy)
        self.model, self.optimizer = self.strategy.model, self.strategy.optimizer
        self.lr_schedule = build_lr_schedule(self.optimizer, cfg.optim, cfg.run.max_steps)
        self.objective = build_objective(cfg.objective, self.spec)
        self.feature_dim = int(self.strategy.unwrapped().config.cap_feat_dim)
        self.loader = build_data(cfg.data, self.feature_dim, self.info, self.run_dir)
        self.manifest = self.loader.manifest
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
        self.metrics = MetricsLogger(self.run_dir, cfg.metrics.tensorboard, enabled=self.info.is_main)
        self.throughput = Throughput()
        self.peak_tflops = device_peak_tflops(self.device, cfg.metrics.peak_tflops)
        self.faults = FaultInjector(cfg.run.fault, self.run_dir, self.rank)
        self.step = 0
        self.skipped_nonfinite = 0
        self.nonfinite_in_row = 0

    # ---- one optimizer step ----------------------------------------------------------------
    def _velocity_fn(self, model: nn.Module, cond):
        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with self.autocast:
                return self.spec.velocity(model, x, sigma, cond)

        return velocity

    def _noise(self, batch: Batch) -> tuple[torch.Tensor, torch.Generator]:
        """Per-sample noise keyed by (seed, step, global sample index).

        The noise of a sample does not depend on how samples are spread over ranks, so a run on
        2 ranks x 1 sample sees the same noise as one process with 2 samples, and a resumed run
        replays it exactly.
        """
        shape = self.spec.latent_shape(*batch.bucket)
        first = self.rank * len(batch)
        base = self.cfg.run.seed * 1_000_003 + self.step * 65_537
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(base + first + i)) for i in range(len(batch))]
        return torch.stack(noise).to(self.device), torch.Generator().manual_seed(base)

    def train_step(self, batch: Batch) -> tuple[RolloutStats, float]:
        """Roll out, back-propagate, clip, step, update the teacher. Returns (stats, grad norm)."""
        self.strategy.zero_grad()
        noise, gen = self._noise(batch)
        student = self._velocity_fn(self.model, batch.student)
        backward = self.strategy.backward
        if isinstance(self.objective, SFTObjective):
            stats = self.objective(student, batch.latents, noise, generator=gen, backward=backward)
        else:
            teacher = self._velocity_fn(self.teacher.module, batch.teacher)
            stats = self.objective(student, teacher, noise, generator=gen, backward=backward)
        stats.loss = self.faults.maybe_poison(self.step + 1, stats.loss)
        grad_norm = self.strategy.clip_grad_norm(self.cfg.optim.grad_clip or float("inf"))
        # every rank must take the same decision, so the flag is reduced
        bad = all_reduce_max([0.0 if torch.isfinite(torch.tensor([stats.loss, grad_norm])).all() else 1.0],
                             self.device)[0]
        if bad:
            self._skip_nonfinite()
        else:
            self.nonfinite_in_row = 0
            self.strategy.optimizer_step()
            self.teacher.update(self.model, self.strategy.local_params)
        with warnings.catch_warnings():
            # the schedule follows the step count, skipped steps included: torch warns when the
            # first optimizer step was the one skipped
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.lr_schedule.step()
        return stats, grad_norm

    def _skip_nonfinite(self) -> None:
        self.skipped_nonfinite += 1
        self.nonfinite_in_row += 1
        self.strategy.zero_grad()
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                    self.step, self.nonfinite_in_row)
        if self.nonfinite_in_row >= self.cfg.run.max_nonfinite_in_row:
            raise NonFiniteAbort(
                f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient (run.max_nonfinite_in_row="
                f"{self.cfg.run.max_nonfinite_in_row}): lower optim.lr or check the data; last checkpoint: "
                f"{self.checkpointer.latest()}"
            )

    def step_flops(self, batch: Batch, stats: RolloutStats) -> float:
        """Model FLOPs of the step on this rank: forward = F, forward+backward = 3F, per sample."""
        shape = self.spec.latent_shape(*batch.bucket)
        model = self.strategy.unwrapped()
        f_s = self.spec.flops_per_forward(model, shape, int(batch.student.lengths.float().mean()))
        f_t = self.spec.flops_per_forward(model, shape, int(batch.teacher.lengths.float().mean()))
        trained = sum(1 for v in stats.loss_per_step if v is not None)
        untrained = stats.student_forwards - trained
        return len(batch) * (3 * f_s * trained + f_s * untrained + f_t * stats.teacher_forwards)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.resume()
        log.info("training %s from %s: steps %d..%d on %d rank(s), parallel=%s", cfg.model.name,
                 cfg.model.path, self.step, cfg.run.max_steps, self.world_size, cfg.parallel.kind)
        with StopRequest(self.run_dir) as stop:
            while self.step < cfg.run.max_steps:
                self.faults.maybe_fail(self.step + 1)
                self._one_step()
                if all_reduce_max([float(stop.requested)], self.device)[0]:
                    log.warning("stop requested: saving a checkpoint at step %d and exiting", self.step)
                    self.save()
                    self.checkpointer.wait()
                    if self.info.is_main:
                        stop.clear()
                    self.metrics.close()
                    return
        self.finish()

    def _one_step(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = next(self.loader).to(self.device)
        wait = time.perf_counter() - t0
        stats, grad_norm = self.train_step(batch)
        self.step += 1
        self.throughput.add(len(batch), self.step_flops(batch, stats), wait)
        if self.step % cfg.metrics.log_every == 0 or self.step == cfg.run.max_steps:
            self.log_metrics(stats, grad_norm)
        if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
            self.save()
        if cfg.metrics.val_every > 0 and self.step % cfg.metrics.val_every == 0:
            self.validate()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # other ranks may be gone: nothing collective, nothing that waits on them
            self.metrics.close()

    def close(self) -> None:
        """Finish pending saves and what the parallel strategy has in flight (a clean end)."""
        self.checkpointer.wait()
        self.strategy.close()
        self.metrics.close()

    def finish(self) -> None:
        cfg = self.cfg
        self.checkpointer.wait()
        latest = self.checkpointer.latest()
        if cfg.checkpoint.save_final and (latest is None or latest.name != f"step_{self.step:08d}"):
            self.save()
            self.checkpointer.wait()
        if cfg.metrics.val_every >= 0:
            self.validate()
        if cfg.checkpoint.export_final:
            self.export(self.run_dir / "export")
        self.metrics.close()

    def log_metrics(self, stats: RolloutStats, grad_norm: float) -> None:
        local = self.throughput.report()
        loss, gap_mean, wait_mean = all_reduce_mean(
            [stats.loss, _mean(stats.gap_per_step), local["data_wait_share"]], self.device)
        samples, flops = (v * self.world_size for v in all_reduce_mean([local["samples_per_s"], local["tflops"]],
                                                                         self.device))
        record: dict[str, Any] = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.lr_schedule.get_last_lr()[0],
            "skipped_nonfinite": self.skipped_nonfinite,
            "batches_consumed": self.loader.consumed,
            "data_epoch": self.loader.epoch,
            "data_skipped": all_reduce_max([float(self.loader.skipped)], self.device)[0],
            "samples_per_s": samples,
            "tflops": flops,
            "data_wait_share": wait_mean,
            "data_wait_share_max": all_reduce_max([local["data_wait_share"]], self.device)[0],
        }
        if self.peak_tflops:
            record["mfu"] = flops * 1e12 / (self.peak_tflops * 1e12 * self.world_size)
        for k, (step_loss, gap) in enumerate(zip(stats.loss_per_step, stats.gap_per_step)):
            if step_loss is not None:
                record[f"loss_step_{k}"] = step_loss
                record[f"gap_step_{k}"] = gap
        if any(g is not None for g in stats.gap_per_step):
            record["teacher_student_gap"] = gap_mean
        if self.device.type == "cuda":
            record["peak_mem_gib"] = all_reduce_max([torch.cuda.max_memory_allocated(self.device) / 2**30],
                                                    self.device)[0]
        self.metrics.log(self.step, record)
        if self.on_log is not None:
            self.on_log(self.step, record)
        log.info("step %d loss %.5f grad %.3f %.2f samples/s", self.step, loss, grad_norm, samples)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        extra = {
            "step": self.step,
            "lr_schedule": {"last_epoch": self.lr_schedule.last_epoch},
            "data": self.loader.state_dict(),
            "skipped_nonfinite": self.skipped_nonfinite,
            "world_size": self.world_size,
            "config": to_dict(self.cfg),
        }
        self.faults.maybe_fail_in_save(self.step)
        path = self.checkpointer.save(self.step, self.strategy, extra)
        log.info("saved checkpoint %s", path)
        return path

    def resume(self, path: Optional[Path] = None) -> bool:
        path = path or self.checkpointer.resolve(self.cfg.checkpoint.resume)
        if path is None:
            return False
        extra = self.checkpointer.load(path, self.strategy)
        self.step = int(extra["step"])
        self.lr_schedule.last_epoch = int(extra["lr_schedule"]["last_epoch"])
        self.lr_schedule._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.skipped_nonfinite = int(extra.get("skipped_nonfinite", 0))
        # every old rank's reader state: a resume on another world size needs them all
        data_states = self.checkpointer.data_states(path)
        if data_states:
            self.loader.load_state_dict(data_states)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ---- validation and export -----------------------------------------------------------------
    def validate(self) -> Optional[Path]:
        """All ranks roll out (sharded forwards are collective); rank 0 decodes and saves."""
        return run_validation(self.spec, self.model, self.cfg, self.manifest, self.device, self.autocast,
                              self.step, self.run_dir, self.info.is_main)

    def export(self, out_dir: Path) -> Optional[Path]:
        """Gather the student's full weights (collective) and write a diffusers directory on rank 0."""
        state = self.strategy.full_state_dict()
        target = None
        if self.info.is_main:
            plain = self.spec.load_transformer_from_config()
            plain.load_state_dict(state)
            target = self.spec.export(plain, out_dir)
            log.info("exported %s", target)
        barrier()
        return target


def _mean(values: list[Optional[float]]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else 0.0
