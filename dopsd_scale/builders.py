"""The `build_*` functions the Trainer is assembled from, and the start-up checks of its data.

Each takes the sub-config it needs. The checks refuse, at start-up and in one line naming the
setting, feature shards that cannot serve the run (another teacher context, model family or text
features than the run's, no target latents for SFT, an anchor set that is not one).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .attention import apply_attention_backend, resolve_backend
from .config import Config, ConfigError, DataConfig, ModelConfig, ObjectiveConfig, RunConfig
from .contexts import uses_reference_latents
from .data.reader import FeatureLoader, build_loader
from .distributed import DistInfo
from .flow import schedule
from .lora import add_adapters
from .models import ModelSpec
from .objectives import DOPSDObjective, SFTObjective
from .parallel import ParallelStrategy
from .teacher import AdapterTeacher, Teacher

log = logging.getLogger(__name__)


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
    if dtype == torch.bfloat16 and cfg.finetune == "full":  # LoRA: a frozen bf16 base, fp32 adapters
        log.warning(
            "model.dtype=bfloat16: AdamW updates below ~0.4%% of a weight round away in bf16 master "
            "weights; prefer float32 masters with bf16 compute (run.mixed_precision, parallel.param_dtype). "
            "The EMA teacher is kept in float32 either way."
        )
    model = spec.load_transformer(dtype).to(device)
    apply_attention_backend(model, resolve_backend(cfg.attention_backend, device, spec.attention_backends))
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.compile:
        # Regional: each repeated block's forward, compiled once per block class and bound per block, so
        # that a deep copy (the EMA teacher) rebinds to its own weights (nn.Module.compile, which diffusers'
        # compile_repeated_blocks uses, is dropped by a deep copy). FSDP2 shards the blocks afterwards.
        # Dynamic shapes: caption lengths and buckets vary; one graph per block variant and grad mode.
        kinds = tuple(getattr(model, "_repeated_blocks", None) or ())
        blocks = [m for m in model.modules() if type(m).__name__ in kinds]
        if not blocks:
            raise ConfigError(f"config field 'model.compile': {type(model).__name__} names no repeated blocks")
        compiled = {kind: torch.compile(kind.forward, dynamic=True) for kind in {type(b) for b in blocks}}
        for block in blocks:
            block.forward = compiled[type(block)].__get__(block)
    return model.train()


def build_objective(cfg: ObjectiveConfig, spec: ModelSpec, anchor: bool = False):
    """The main objective, or (`anchor`) the D-OPSD roll-out of the anchor part whatever the main
    objective is: anchoring is on-policy self-distillation on prompts (weight: anchor.weight)."""
    sigmas = schedule(cfg.sigmas if cfg.sigmas is not None else spec.train_sigmas(cfg.num_steps, schedule=cfg.schedule))
    if anchor:
        return DOPSDObjective(sigmas, cfg.space, cfg.steps, cfg.per_step_backward, 1.0)
    if cfg.kind == "sft":
        return SFTObjective(sigmas, weight=cfg.loss_weight, sampling=cfg.sft_sigmas, shift=spec.shifted_sigmas)
    return DOPSDObjective(sigmas, cfg.space, cfg.steps, cfg.per_step_backward, cfg.loss_weight)


def build_data(cfg: DataConfig, feature_dim: int, info: DistInfo, run_dir: Path) -> FeatureLoader:
    """This rank's reader; skipped samples are listed in `<run>/data_report.jsonl`."""
    return build_loader(
        cfg.path,
        cfg.batch_size,
        feature_dim,
        cfg.num_workers,
        cfg.shuffle_buffer,
        cfg.seed,
        info.rank,
        info.world_size,
        manifest=cfg.manifest,
        report_path=str(run_dir / "data_report.jsonl"),
    )


def build_anchor_data(cfg: Config, feature_dim: int, info: DistInfo, run_dir: Path) -> Optional[FeatureLoader]:
    """The anchor set's reader (its own stream, seed and position), or None without anchoring."""
    a, d = cfg.anchor, cfg.data
    if a.path is None:
        return None
    return build_loader(
        a.path,
        a.batch_size or d.batch_size,
        feature_dim,
        d.num_workers,
        d.shuffle_buffer,
        d.seed + 1,
        info.rank,
        info.world_size,
        manifest=a.manifest,
        report_path=str(run_dir / "anchor_report.jsonl"),
    )


def check_anchor_manifest(cfg: Config, producer: dict) -> None:
    """An anchor set holds prompt-only samples with the `prompt` context, for this model."""
    where = cfg.anchor.manifest or cfg.anchor.path
    context = (producer.get("teacher_context") or {}).get("kind")
    if context != "prompt":
        raise ConfigError(
            f"config field 'anchor.path': {where} is not an anchor set (teacher context {context!r}, "
            "expected 'prompt': cache it with cache-features --prompts-only)"
        )
    model = (producer.get("model") or {}).get("name")
    if model != cfg.model.name:
        raise ConfigError(
            f"config field 'anchor.path': {where} was cached for {model!r}, the run trains {cfg.model.name!r}"
        )


def check_feature_manifest(cfg: Config, spec: ModelSpec, producer: dict) -> None:
    """Refuse at start-up shards that cannot serve this run (one line naming the setting)."""
    where = cfg.data.manifest or cfg.data.path
    context = (producer.get("teacher_context") or {}).get("kind")
    if context is None:
        raise ConfigError(f"config field 'data.path': {where} records no teacher context (re-cache the features)")
    if context != cfg.teacher.context:
        raise ConfigError(
            f"config field 'teacher.context': {cfg.teacher.context!r}, but the shards at {where} hold "
            f"the {context!r} context"
        )
    if uses_reference_latents(context) and not spec.accepts_reference_latents:
        raise ConfigError(
            f"config field 'teacher.context': {context!r} gives reference images, which the "
            f"{spec.name!r} model spec cannot take"
        )
    model = (producer.get("model") or {}).get("name")
    if model is not None and model != cfg.model.name:
        raise ConfigError(
            f"config field 'model.name': {cfg.model.name!r}, but the shards at {where} were cached for {model!r}"
        )
    problem = spec.check_student_features(producer.get("student_encoder") or {})
    if problem:
        raise ConfigError(f"config field 'data.path': {where}: {problem}")
    if cfg.objective.kind == "sft" and not producer.get("latents"):
        raise ConfigError(
            f"config field 'objective.kind': sft needs target latents, and {where} has none (cache-features --latents)"
        )


def build_student_and_teacher(
    spec: ModelSpec, cfg: Config, device: torch.device, strategy: ParallelStrategy
) -> Teacher | AdapterTeacher:
    """The student and teacher copies, handed to the strategy to wrap and shard together (LoRA
    mode: one model with the student and teacher adapters; the teacher is a view of it)."""
    model = build_model(spec, cfg.model, device)
    if cfg.model.finetune == "lora":
        lo = cfg.lora
        add_adapters(
            model,
            lo.rank,
            lo.alpha,
            lo.target_modules or spec.lora_target_modules,
            lo.dropout,
            teacher=cfg.teacher.kind == "ema",
        )
        lora_teacher = AdapterTeacher(model, cfg.teacher.kind, cfg.teacher.ema_decay)
        strategy.setup(model, None, spec.sharding_units(model), cfg.optim, teacher_keys=lora_teacher.keys)
        lora_teacher.bind(strategy.model)
        return lora_teacher
    teacher = Teacher(model, cfg.teacher.kind, cfg.teacher.ema_decay)
    strategy.setup(model, teacher.module if teacher.owns_weights else None, spec.sharding_units(model), cfg.optim)
    teacher.module = strategy.teacher if teacher.owns_weights else strategy.model
    return teacher
