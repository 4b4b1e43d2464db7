"""The D-OPSD trainer: assembled from `builders.py`, one `train_step`, and the loop around it.

The trainer is written for one rank. The same object runs in a single process, under torchrun,
and inside a Ray Train worker; the parallel strategy (none, FSDP2, DeepSpeed) decides how the
student, its optimizer and the teacher are sharded. Ray is an orchestrator, not a dependency.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .builders import (
    build_anchor_data,
    build_autocast,
    build_data,
    build_device,
    build_objective,
    build_student_and_teacher,
    check_anchor_manifest,
    check_feature_manifest,
)
from .checkpoint import Checkpointer
from .config import Config, save_config, to_dict
from .data.reader import Batch, FeatureLoader
from .distributed import (
    all_reduce_max,
    all_reduce_max_tensor,
    all_reduce_mean,
    barrier,
    configure_rank_logging,
    init_distributed,
)
from .faults import FaultInjector, StopRequest
from .flow import schedule
from .lora import STUDENT, adapter_keys
from .lora_files import adapter_to_peft, export_lora
from .metrics import MetricsLogger, Throughput, device_peak_tflops
from .models import get_spec
from .objectives.stats import RolloutStats, StepStats, mean_present, step_to_host
from .optim import build_lr_schedule, load_schedule_state, schedule_state
from .parallel import build_parallel
from .validation import read_pairs, run_validation

log = logging.getLogger(__name__)


class NonFiniteAbort(RuntimeError):
    pass


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
        self.feature_dim = self.spec.feature_dim(self.strategy.unwrapped())
        self.loader = build_data(cfg.data, self.feature_dim, self.info, self.run_dir)
        self.manifest = self.loader.manifest
        check_feature_manifest(cfg, self.spec, self.manifest.producer)
        self.anchor_loader = build_anchor_data(cfg, self.feature_dim, self.info, self.run_dir)
        if self.anchor_loader is not None:
            check_anchor_manifest(cfg, self.anchor_loader.manifest.producer)
            self.anchor_objective = build_objective(cfg.objective, self.spec, anchor=True)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
        self.metrics = MetricsLogger(self.run_dir, cfg.metrics.tensorboard, enabled=self.info.is_main)
        # a few training samples (they hold the teacher's context): student and teacher side by side
        self.val_pairs = (
            read_pairs(cfg.data.path, cfg.metrics.val_pairs, cfg.data.manifest)
            if cfg.metrics.val_every >= 0 and cfg.metrics.val_pairs
            else None
        )
        self.throughput = Throughput()
        self.peak_tflops = device_peak_tflops(self.device, cfg.metrics.peak_tflops)
        self.faults = FaultInjector(cfg.run.fault, self.run_dir, self.rank)
        self._sigmas: dict[tuple[int, int], torch.Tensor] = {}
        self.step = 0
        self.skipped_nonfinite = 0
        self.nonfinite_in_row = 0

    # ---- one optimizer step ----------------------------------------------------------------
    def _velocity_fn(self, model: nn.Module, cond):
        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with self.autocast:
                return self.spec.velocity(model, x, sigma, cond)

        return velocity

    def sigmas_for(self, bucket: tuple[int, int]) -> torch.Tensor:
        """The roll-out schedule of a bucket: explicit `objective.sigmas`, else the spec's for the
        bucket's resolution (FLUX.2-klein's shift depends on it), cached."""
        o = self.cfg.objective
        if bucket not in self._sigmas:
            shape = self.spec.latent_shape(*bucket)
            sigmas = o.sigmas if o.sigmas is not None else self.spec.train_sigmas(o.num_steps, shape, o.schedule)
            self._sigmas[bucket] = schedule(sigmas)
        return self._sigmas[bucket]

    def _noise(self, batch: Batch, stream: int = 0) -> tuple[torch.Tensor, torch.Generator]:
        """Per-sample noise keyed by (seed, step, stream, global sample index); stream 1 is the anchors.

        The noise of a sample does not depend on how samples are spread over ranks, so a run on
        2 ranks x 1 sample sees the same noise as one process with 2 samples, and a resumed run
        replays it exactly.
        """
        shape = self.spec.latent_shape(*batch.bucket)
        first = self.rank * len(batch)
        base = self.cfg.run.seed * 1_000_003 + self.step * 65_537 + stream * 7_919_993
        noise = [
            torch.randn(shape, generator=torch.Generator().manual_seed(base + first + i)) for i in range(len(batch))
        ]
        return torch.stack(noise).to(self.device), torch.Generator().manual_seed(base)

    def accumulate_gradients(self, batch: Batch, anchor: Optional[Batch] = None) -> StepStats:
        """Roll out the main batch (and the anchor batch) and back-propagate into the student.

        The gradient is that of `loss_main + anchor.weight * loss_anchor`; each part rolls out with
        the teacher seeing its own samples' context (the anchors': their prompt). Only the very last
        backward of the step is marked last (deferred gradient sync happens there).
        """
        parts = [(batch, self.objective, 1.0)]
        if anchor is not None:
            parts.append((anchor, self.anchor_objective, self.cfg.anchor.weight))
        out = []
        for i, (part, objective, weight) in enumerate(parts):
            final = i == len(parts) - 1
            backward = self.strategy.backward if final else (lambda loss, last: self.strategy.backward(loss, False))
            noise, gen = self._noise(part, stream=i)
            student = self._velocity_fn(self.model, part.student)
            teacher = self._velocity_fn(self.teacher.module, part.teacher)
            out.append(
                objective(
                    student,
                    teacher,
                    noise,
                    latents=part.latents,
                    loss_scale=weight,
                    generator=gen,
                    backward=backward,
                    sigmas=self.sigmas_for(part.bucket),
                )
            )
        return StepStats(main=out[0], anchor=out[1] if anchor is not None else None)

    def train_step(self, batch: Batch, anchor: Optional[Batch] = None, stop_requested: bool = False) -> StepStats:
        """Roll out, back-propagate, clip, step, update the teacher.

        The stats and grad norm stay on the device; the one host sync of the step is the flag
        vector [non-finite, stop requested], reduced over ranks so that every rank takes the same
        decision.
        """
        self.strategy.zero_grad()
        stats = self.accumulate_gradients(batch, anchor)
        stats.main.loss = self.faults.maybe_poison(self.step + 1, stats.main.loss)
        stats.grad_norm = torch.as_tensor(
            self.strategy.clip_grad_norm(self.cfg.optim.grad_clip or float("inf")), device=self.device
        )
        finite = torch.isfinite(torch.as_tensor(stats.total_loss, device=self.device)) & torch.isfinite(stats.grad_norm)
        flags = torch.stack(
            [(~finite).double(), torch.tensor(float(stop_requested), device=self.device, dtype=torch.float64)]
        )
        bad, stats.stop = (bool(v) for v in all_reduce_max_tensor(flags).tolist())
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
        return stats

    def _skip_nonfinite(self) -> None:
        self.skipped_nonfinite += 1
        self.nonfinite_in_row += 1
        self.strategy.zero_grad()
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row)", self.step, self.nonfinite_in_row
        )
        if self.nonfinite_in_row >= self.cfg.run.max_nonfinite_in_row:
            raise NonFiniteAbort(
                f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient (run.max_nonfinite_in_row="
                f"{self.cfg.run.max_nonfinite_in_row}): lower optim.lr or check the data; last checkpoint: "
                f"{self.checkpointer.latest()}"
            )

    def step_flops(self, batch: Batch, stats: RolloutStats, lengths: tuple[float, float]) -> float:
        """Model FLOPs of one part of the step on this rank: forward = F, forward+backward = 3F, per
        sample. `lengths`: mean student and teacher condition lengths (from the host batch)."""
        shape = self.spec.latent_shape(*batch.bucket)
        model = self.strategy.unwrapped()
        ref = batch.teacher.ref_latents  # [B, R, C, h, w]: its shape is host metadata, no sync
        ref_tokens = 0 if ref is None else ref.shape[1] * ref.shape[3] * ref.shape[4] // self.spec.ref_patch_area
        f_s = self.spec.flops_per_forward(model, shape, int(lengths[0]))
        f_t = self.spec.flops_per_forward(model, shape, int(lengths[1]), ref_tokens=ref_tokens)
        trained = sum(1 for v in stats.loss_per_step if v is not None)
        untrained = stats.student_forwards - trained
        return len(batch) * (3 * f_s * trained + f_s * untrained + f_t * stats.teacher_forwards)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.resume()
        log.info(
            "training %s from %s: steps %d..%d on %d rank(s), parallel=%s",
            cfg.model.name,
            cfg.model.path,
            self.step,
            cfg.run.max_steps,
            self.world_size,
            cfg.parallel.kind,
        )
        with StopRequest(self.run_dir) as stop:
            while self.step < cfg.run.max_steps:
                self.faults.maybe_fail(self.step + 1)
                if self._one_step(stop.requested):
                    log.warning("stop requested: saving a checkpoint at step %d and exiting", self.step)
                    self.save()
                    self.checkpointer.wait()
                    if self.info.is_main:
                        stop.clear()
                    self.metrics.close()
                    return
        self.finish()

    def _one_step(self, stop_requested: bool = False) -> bool:
        """One optimizer step with its logging, checkpoint and validation; True when a stop was requested."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batch, lengths = self._next_batch(self.loader)
        anchor, anchor_lengths = self._next_batch(self.anchor_loader) if self.anchor_loader else (None, None)
        wait = time.perf_counter() - t0
        stats = self.train_step(batch, anchor, stop_requested)
        self.step += 1
        flops = self.step_flops(batch, stats.main, lengths)
        if anchor is not None:
            flops += self.step_flops(anchor, stats.anchor, anchor_lengths)
        self.throughput.add(len(batch) + (len(anchor) if anchor is not None else 0), flops, wait)
        if self.step % cfg.metrics.log_every == 0 or self.step == cfg.run.max_steps:
            self.log_metrics(stats)
        if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
            self.save()
        if cfg.metrics.val_every > 0 and self.step % cfg.metrics.val_every == 0:
            self.validate()
        return stats.stop

    def _next_batch(self, loader: FeatureLoader) -> tuple[Batch, tuple[float, float]]:
        """The next batch on the device, and its mean condition lengths read on the host (FLOPs)."""
        host = next(loader)
        lengths = (host.student.lengths.float().mean().item(), host.teacher.lengths.float().mean().item())
        return host.to(self.device, non_blocking=True), lengths

    def __enter__(self) -> Trainer:
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

    def log_metrics(self, step_stats: StepStats) -> None:
        """The logging step's metrics: one device-to-host transfer of the step's statistics, then
        one mean and one max over ranks of everything that is reduced (two collectives)."""
        stats, anchor, grad_norm = step_to_host(step_stats)
        local = self.throughput.report()
        means = [stats.loss, mean_present(stats.gap_per_step), local["data_wait_share"]]
        means += [local["samples_per_s"], local["tflops"]]
        if anchor is not None:
            means += [anchor.loss, mean_present(anchor.gap_per_step)]
        peak_mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        maxes = [float(self.loader.skipped), local["data_wait_share"], peak_mem]
        loss, gap_mean, wait_mean, samples, flops, *anchor_means = all_reduce_mean(means, self.device)
        skipped, wait_max, peak_mem = all_reduce_max(maxes, self.device)
        samples, flops = samples * self.world_size, flops * self.world_size
        record: dict[str, Any] = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.lr_schedule.get_last_lr()[0],
            "skipped_nonfinite": self.skipped_nonfinite,
            "batches_consumed": self.loader.consumed,
            "data_epoch": self.loader.epoch,
            "data_skipped": skipped,
            "samples_per_s": samples,
            "tflops": flops,
            "data_wait_share": wait_mean,
            "data_wait_share_max": wait_max,
        }
        if self.peak_tflops:
            record["mfu"] = flops * 1e12 / (self.peak_tflops * 1e12 * self.world_size)
        for k, (step_loss, gap) in enumerate(zip(stats.loss_per_step, stats.gap_per_step)):
            if step_loss is not None:
                record[f"loss_step_{k}"] = step_loss
                record[f"gap_step_{k}"] = gap
        if any(g is not None for g in stats.gap_per_step):
            record["teacher_student_gap"] = gap_mean
        if anchor is not None:
            record["anchor_loss"], record["anchor_gap"] = anchor_means
        if self.device.type == "cuda":
            record["peak_mem_gib"] = peak_mem
        self.metrics.log(self.step, record)
        if self.on_log is not None:
            self.on_log(self.step, record)
        log.info("step %d loss %.5f grad %.3f %.2f samples/s", self.step, loss, grad_norm, samples)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        extra = {
            "step": self.step,
            "lr_schedule": schedule_state(self.lr_schedule),
            "data": self.loader.state_dict(),
            "anchor_data": self.anchor_loader.state_dict() if self.anchor_loader else None,
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
        load_schedule_state(self.lr_schedule, extra["lr_schedule"])
        self.skipped_nonfinite = int(extra.get("skipped_nonfinite", 0))
        # every old rank's reader state: a resume on another world size needs them all
        data_states = self.checkpointer.data_states(path)
        if data_states:
            self.loader.load_state_dict(data_states)
        anchor_states = self.checkpointer.data_states(path, key="anchor_data")
        if self.anchor_loader is not None and anchor_states:
            self.anchor_loader.load_state_dict(anchor_states)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ---- validation and export -----------------------------------------------------------------
    def validate(self) -> Optional[Path]:
        """All ranks roll out (sharded forwards are collective); rank 0 decodes and saves."""
        return run_validation(
            self.spec,
            self.model,
            self.cfg,
            self.manifest,
            self.device,
            self.autocast,
            self.step,
            self.run_dir,
            self.info.is_main,
            pairs=self.val_pairs,
            teacher=self.teacher.module,
            logger=self.metrics,
        )

    def export(self, out_dir: Path) -> Optional[Path]:
        """Gather the student's full weights (collective) and write a diffusers directory on rank 0.
        LoRA mode: only the student adapter, as the family's diffusers LoRA file (`<out>/lora`)
        and, with `lora.export_merged`, a whole pipeline with it merged (`<out>/merged`)."""
        lora = self.cfg.lora if self.cfg.model.finetune == "lora" else None
        state = self.strategy.full_state_dict(adapter_keys(self.strategy.unwrapped(), STUDENT) if lora else None)
        target = None
        if self.info.is_main:
            if lora:
                target = export_lora(
                    self.spec,
                    adapter_to_peft(state, STUDENT),
                    lora.alpha / lora.rank,
                    out_dir,
                    merged=lora.export_merged,
                )
            else:
                plain = self.spec.load_transformer_from_config()
                plain.load_state_dict(state)
                target = self.spec.export(plain, out_dir)
            log.info("exported %s", target)
        barrier()
        return target
