"""The run configuration: one typed tree of dataclasses.

Precedence is defaults < YAML file < dotted CLI overrides (``optim.lr=1e-5``). OmegaConf's
structured configs do the merge, reject unknown keys and wrong types; :func:`validate` then
checks the values. Every error is raised as :class:`ConfigError` with one line naming the field.
Each field is documented by the string literal under it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A wrong configuration; the message is one line naming the field or file."""


@dataclass
class ModelConfig:
    name: str = "zimage"
    """Model spec in the registry (`zimage`)."""
    path: Optional[str] = None
    """Diffusers directory: a whole pipeline (with model_index.json) or a transformer folder."""
    dtype: str = "float32"
    """Dtype of the master weights (`float32` or `bfloat16`); compute may still autocast. With
    `finetune=lora` the dtype of the frozen base (bfloat16 halves its memory; adapters stay fp32)."""
    finetune: str = "full"
    """`full` (every weight trains) or `lora` (a student adapter trains on the frozen base, the EMA
    teacher is a second adapter; checkpoints hold adapters; see the `lora` section)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass (memory for compute)."""
    attention_backend: str = "auto"
    """`auto` (triton on CUDA, sdpa elsewhere), `sdpa`, `triton` (our kernels) or `flash_attn`."""
    compile: bool = False
    """torch.compile each repeated transformer block (regional: the model's `_repeated_blocks`, one
    compiled graph shared by all blocks of a kind; student and teacher copies). Costs a compile at
    the first steps (minutes for real models) for faster steps after; off by default."""


@dataclass
class LoraConfig:
    rank: int = 64
    """LoRA rank r of the student and teacher adapters (the reference: 64)."""
    alpha: float = 128.0
    """LoRA alpha; the adapter's output is scaled by alpha / rank (the reference: 128)."""
    dropout: float = 0.0
    """Dropout on the student adapter's input (the teacher adapter has none). Above 0 the
    student's on-policy roll-out becomes random too."""
    target_modules: Optional[str] = None
    """Regex of the module names that get adapters (peft full match); default: the model spec's
    attention projections and MLPs of the main blocks (`lora_target_modules`)."""
    export_merged: bool = False
    """At export, also write a whole pipeline with the adapter merged into the base weights
    (`<export>/merged`), beside the adapter file (`<export>/lora`)."""


@dataclass
class DataConfig:
    path: Optional[str] = None
    """Feature shards: a directory holding *.tar and manifest.json, a glob or brace pattern
    (`feats/features-{000000..000127}.tar`), or a `pipe:` command per shard for object stores."""
    manifest: Optional[str] = None
    """The shards' manifest.json; default: the one in / beside `path` (required for `pipe:`)."""
    batch_size: int = 1
    """Samples per rank and optimizer step. A batch always comes from one aspect bucket."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 64
    """Samples held in the shuffle buffer (0 turns shuffling off)."""
    seed: int = 0
    """Seed of the per-epoch shard order and shuffle buffer."""
    val_features: Optional[str] = None
    """Cached validation prompts (safetensors); default `<path>/val_prompts.safetensors` if present."""


@dataclass
class AnchorConfig:
    path: Optional[str] = None
    """Feature shards of an anchor set (`cache-features --prompts-only`): prompts the model already
    handles, rolled out every step beside the main batch and distilled to the EMA teacher given the
    same text (on-policy self-distillation on prompts alone: keeps what the model knew). Unset: off."""
    manifest: Optional[str] = None
    """The anchor shards' manifest.json (default: the one in / beside `path`; required for `pipe:`)."""
    batch_size: int = 0
    """Anchor samples per rank and optimizer step (0: as many as data.batch_size)."""
    weight: float = 1.0
    """Weight of the anchor loss next to the main loss."""
    val_prompts: int = 4
    """Anchor prompts added to the validation grid (forgetting shows there during training)."""


@dataclass
class ObjectiveConfig:
    kind: str = "dopsd"
    """`dopsd` (on-policy self-distillation) or `sft` (flow matching on target latents)."""
    space: str = "x0"
    """Where the D-OPSD distance is measured: `x0` (reference code) or `velocity` (paper)."""
    num_steps: int = 4
    """K, the number of roll-out steps of the student during training."""
    sigmas: Optional[list[float]] = None
    """Explicit roll-out schedule sigma_0..sigma_{K-1} (sigma_K = 0 is implied); default from the spec."""
    schedule: str = "pipeline"
    """Default roll-out schedule (when `sigmas` is unset), per aspect bucket: `pipeline` (the model's
    own K-step inference schedule: on-policy) or `reference` (the public reference code's; differs
    for FLUX.2-klein only)."""
    steps: str = "all"
    """Which roll-out steps are trained: `all`, `last` or `random:N`."""
    per_step_backward: bool = True
    """Backward after each roll-out step: same gradient, 1/K of the activation memory."""
    loss_weight: float = 1.0
    """Multiplier of the distillation loss."""
    sft_sigmas: str = "shifted"
    """SFT only: `shifted` (continuous, through the model's time shift, as Z-Image fine-tunes sample
    it) or `rollout` (only the roll-out schedule's noise levels)."""


@dataclass
class TeacherConfig:
    kind: str = "ema"
    """`ema` (EMA of the student), `frozen` (initial weights) or `live` (current student weights)."""
    ema_decay: float = 0.9999
    """EMA decay per optimizer step, in [0, 1]."""
    context: str = "vlm"
    """Teacher context the feature shards hold (checked against their manifest at start-up): `vlm`
    (Z-Image recipe), `edit_reference` (FLUX.2-klein), `enhanced_prompt`, `prompt`,
    `silhouette_reference` (toy world) or a `module:Class` of your own."""


@dataclass
class ParallelConfig:
    kind: str = "none"
    """`none` (a single process), `fsdp2` or `deepspeed` (any number of ranks)."""
    param_dtype: str = "float32"
    """FSDP2 compute dtype of gathered weights (`bfloat16` on GPUs: MixedPrecisionPolicy)."""
    reduce_dtype: str = "float32"
    """FSDP2 dtype of the gradient reduce-scatter."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered student weights after forward (re-gather in backward): ZeRO-3 memory."""
    defer_grad_sync: bool = False
    """Sync gradients once per step, not after each of the K backwards (holds unsharded grads)."""
    cpu_offload: bool = False
    """Keep sharded weights, gradients and optimizer state in CPU memory (FSDP2 / ZeRO offload)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (2 or 3)."""


@dataclass
class RayConfig:
    num_workers: int = 1
    """Training workers (ranks), one per GPU; Ray places them across the cluster."""
    use_gpu: bool = False
    """Give every worker `gpus_per_worker` GPUs (NCCL); false runs CPU workers on gloo."""
    gpus_per_worker: float = 1.0
    """GPUs per worker when use_gpu."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (data loading workers run inside it)."""
    max_failures: int = 3
    """Restarts of the worker group after a worker or node dies (-1: unlimited)."""
    storage_path: Optional[str] = None
    """Ray Train's storage (shared by all nodes); default `<run.output_dir>/ray`."""
    name: Optional[str] = None
    """Ray run name; default the run directory's name plus a timestamp (unique per submission)."""


@dataclass
class FaultConfig:
    rank: int = -1
    """Rank that fails (-1: no fault injection). For tests of recovery."""
    step: int = 0
    """The optimizer step (1-based) during which it fails (once per run directory)."""
    kind: str = "raise"
    """`raise` (an exception), `kill` (SIGKILL, as a lost node), `save` (raise mid-save) or `nan`."""
    count: int = 1
    """`nan` only: how many consecutive steps get a non-finite loss."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate of AdamW (full fine-tuning wants ~1e-5)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to lr."""
    schedule: str = "constant"
    """LR after warm-up: `constant` or `cosine` (to min_lr_ratio * lr at run.max_steps)."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule as a fraction of lr."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 turns clipping off)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """How many checkpoints to keep (older ones are deleted after a successful save)."""
    resume: str = "auto"
    """`auto` (latest in the run directory, if any), `none`, or a checkpoint directory."""
    save_final: bool = True
    """Save a checkpoint when training ends."""
    async_save: bool = False
    """Write checkpoints in the background (DCP async_save; FSDP2 / single process): training goes
    on while files are written, `latest` moves when they are complete. Costs a host copy of the state."""
    export_final: bool = True
    """Export a diffusers-format model into `<run>/export` when training ends."""


@dataclass
class MetricsConfig:
    log_every: int = 10
    """Write a metrics record every N optimizer steps."""
    tensorboard: bool = True
    """Also log to TensorBoard when it is installed."""
    val_every: int = 0
    """Draw the validation grid every N steps (0: only at the end; -1: never)."""
    val_steps: int = 8
    """Inference steps of the validation sampler (Z-Image-Turbo: 8)."""
    val_height: int = 0
    """Validation image height in pixels (0: the spec's default)."""
    val_width: int = 0
    """Validation image width in pixels (0: the spec's default)."""
    val_seed: int = 1234
    """Seed of the fixed validation noise."""
    val_pairs: int = 4
    """Training samples drawn target | student | teacher in `validation/student_teacher/` (0: none)."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one device for MFU (0: look the device up; unknown on CPU)."""


@dataclass
class RunConfig:
    output_dir: str = "runs/debug"
    """Run directory: config, metrics, checkpoints, validation grids, export."""
    max_steps: int = 100
    """Number of optimizer steps."""
    seed: int = 0
    """Global seed (noise, initialisation of debug models, data order)."""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`."""
    mixed_precision: str = "auto"
    """`auto` (bf16 autocast on GPU, none on CPU), `bf16` or `no`."""
    deterministic: bool = False
    """Ask torch for deterministic algorithms (bitwise-reproducible CPU runs)."""
    max_nonfinite_in_row: int = 5
    """Abort after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""
    fault: FaultConfig = field(default_factory=FaultConfig)
    """Fault injection for recovery tests."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults < YAML at `path` < `key=value` overrides, then :func:`validate`."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:  # YAML syntax errors come in several types
            raise ConfigError(f"{path}: not valid YAML: {_one_line(err)}") from None
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = getattr(err, "msg", None) or str(err).splitlines()[0]
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}config field '{key}': {_one_line(Exception(msg))}") from None
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """The typed tree from a plain dict (e.g. what a Ray worker receives)."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"config field '{getattr(err, 'full_key', None)}': {_one_line(err)}") from None
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), str(path))


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{field_name}': {message}")


def _one_of(value: Any, allowed: tuple, field_name: str) -> None:
    _require(value in allowed, field_name, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def _validate_lora(cfg: Config) -> None:
    lo = cfg.lora
    _require(lo.rank >= 1, "lora.rank", f"must be >= 1, got {lo.rank}")
    _require(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
    _require(0 <= lo.dropout < 1, "lora.dropout", f"must lie in [0, 1), got {lo.dropout}")
    if lo.target_modules is not None:
        try:
            re.compile(lo.target_modules)
        except re.error as err:
            _require(False, "lora.target_modules", f"not a valid regex: {err}")
    _require(
        cfg.parallel.kind != "deepspeed" or cfg.parallel.zero_stage == 2,
        "parallel.zero_stage",
        "model.finetune=lora runs under DeepSpeed ZeRO-2 only (a LoRA adapter is small: ZeRO-3 saves nothing)",
    )


STEPS_PATTERN = re.compile(r"^(all|last|random:([1-9][0-9]*))$")


def validate(cfg: Config) -> None:
    """Value checks the type system cannot express; raises :class:`ConfigError`."""
    from .models import spec_names  # local import: models import heavy libraries

    m, o, t, opt = cfg.model, cfg.objective, cfg.teacher, cfg.optim
    _one_of(m.name, tuple(spec_names()), "model.name")
    _require(bool(m.path), "model.path", "missing: set it to a diffusers model directory")
    _require(os.path.isdir(m.path), "model.path", f"directory not found: {m.path}")
    _one_of(m.dtype, ("float32", "bfloat16"), "model.dtype")
    _one_of(m.attention_backend, ("auto", "sdpa", "triton", "flash_attn"), "model.attention_backend")
    _one_of(m.finetune, ("full", "lora"), "model.finetune")
    if m.finetune == "lora":
        _validate_lora(cfg)
    _require(cfg.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {cfg.data.batch_size}")
    _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    _one_of(o.kind, ("dopsd", "sft"), "objective.kind")
    _one_of(o.space, ("x0", "velocity"), "objective.space")
    _one_of(o.sft_sigmas, ("shifted", "rollout"), "objective.sft_sigmas")
    _one_of(o.schedule, ("pipeline", "reference"), "objective.schedule")
    _require(o.num_steps >= 1, "objective.num_steps", f"K must be >= 1, got {o.num_steps}")
    match = STEPS_PATTERN.match(o.steps)
    _require(match is not None, "objective.steps", f"{o.steps!r} is not all, last or random:N")
    if match and match.group(2):
        _require(int(match.group(2)) <= o.num_steps, "objective.steps", "random:N needs N <= num_steps")
    if o.sigmas is not None:
        s = list(o.sigmas)
        _require(len(s) == o.num_steps, "objective.sigmas", f"has {len(s)} values, num_steps is {o.num_steps}")
        _require(all(0 < v <= 1 for v in s), "objective.sigmas", "values must lie in (0, 1]")
        _require(all(a > b for a, b in zip(s, s[1:])), "objective.sigmas", "must be strictly decreasing")
    _one_of(t.kind, ("ema", "frozen", "live"), "teacher.kind")
    _require(0.0 <= t.ema_decay <= 1.0, "teacher.ema_decay", f"must lie in [0, 1], got {t.ema_decay}")
    from .contexts import context_names

    _require(
        t.context in context_names() or ":" in t.context,
        "teacher.context",
        f"{t.context!r} is not one of {', '.join(context_names())} (or module:Class)",
    )
    _require(opt.lr > 0, "optim.lr", f"must be > 0, got {opt.lr}")
    _require(len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas), "optim.betas", "two values in [0, 1)")
    _require(opt.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _one_of(opt.schedule, ("constant", "cosine"), "optim.schedule")
    _require(0 <= opt.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
    _require(opt.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    _require(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _require(cfg.metrics.log_every >= 1, "metrics.log_every", "must be >= 1")
    _require(cfg.metrics.val_steps >= 1, "metrics.val_steps", "must be >= 1")
    _require(cfg.metrics.val_pairs >= 0, "metrics.val_pairs", "must be >= 0")
    _require(cfg.run.max_steps >= 0, "run.max_steps", "must be >= 0")
    _one_of(cfg.run.device, ("auto", "cpu", "cuda"), "run.device")
    _require(cfg.run.max_nonfinite_in_row >= 1, "run.max_nonfinite_in_row", "must be >= 1")
    _one_of(cfg.run.fault.kind, ("raise", "kill", "save", "nan"), "run.fault.kind")
    par = cfg.parallel
    _one_of(par.kind, ("none", "fsdp2", "deepspeed"), "parallel.kind")
    _one_of(par.param_dtype, ("float32", "bfloat16", "float16"), "parallel.param_dtype")
    _one_of(par.reduce_dtype, ("float32", "bfloat16"), "parallel.reduce_dtype")
    _one_of(par.zero_stage, (2, 3), "parallel.zero_stage")
    _require(cfg.ray.num_workers >= 1, "ray.num_workers", "must be >= 1")
    _require(cfg.ray.max_failures >= -1, "ray.max_failures", "must be >= -1")
    _one_of(cfg.run.mixed_precision, ("auto", "bf16", "no"), "run.mixed_precision")
    if cfg.data.path is None:
        _require(False, "data.path", "missing: set it to a directory of feature shards")
    elif cfg.data.path.startswith("pipe:"):
        _require(bool(cfg.data.manifest), "data.manifest", "missing: a pipe: data.path needs the manifest.json path")
    elif not any(c in cfg.data.path for c in "*?[{"):
        _require(os.path.isdir(cfg.data.path), "data.path", f"directory not found: {cfg.data.path}")
    if cfg.data.manifest is not None:
        _require(os.path.isfile(cfg.data.manifest), "data.manifest", f"file not found: {cfg.data.manifest}")
    a = cfg.anchor
    _require(a.batch_size >= 0, "anchor.batch_size", f"must be >= 0, got {a.batch_size}")
    _require(a.weight >= 0, "anchor.weight", f"must be >= 0, got {a.weight}")
    _require(a.val_prompts >= 0, "anchor.val_prompts", "must be >= 0")
    if a.path is not None:
        if a.path.startswith("pipe:"):
            _require(bool(a.manifest), "anchor.manifest", "missing: a pipe: anchor.path needs the manifest.json path")
        elif not any(c in a.path for c in "*?[{"):
            _require(os.path.isdir(a.path), "anchor.path", f"directory not found: {a.path}")
