"""Validation grids: fixed prompts sampled few-step by the student from fixed noise, and a few
training pairs rolled out by the student (prompt only) and the teacher (its context) side by side.

The prompts' features come cached (val_prompts.safetensors), so no encoder is loaded; the VAE
decodes the latents when the model directory has one, else the first latent channels are shown.
Validation prompts have no teacher context, so the teacher's roll-out is drawn on training
samples instead (`read_pairs`: the first samples of the shards, the same at every validation and
after a resume): each row is target | student | teacher from the same noise, which shows what
the student is being pulled toward. Both grids go to `<run>/validation/` as PNG files and, when a
metrics logger with TensorBoard is given, to TensorBoard as images.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from .flow import euler_rollout, schedule
from .models.spec import Condition, ModelSpec

log = logging.getLogger(__name__)

VAL_PAIRS = 4
"""Training samples rolled out by student and teacher in the validation grid."""


def images_to_grid(images: torch.Tensor, columns: Optional[int] = None) -> Image.Image:
    """[B, 3, H, W] in [0, 1] -> one PIL image, row-major."""
    b, _, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i, arr in enumerate(arrays):
        grid.paste(Image.fromarray(arr), ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def sample_latents(
    spec: ModelSpec,
    model: nn.Module,
    feats: list[torch.Tensor],
    height: int,
    width: int,
    num_steps: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Few-step Euler roll-out of the student, one prompt per sample, fixed noise."""
    shape = spec.latent_shape(height, width)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(feats), *shape), generator=gen).to(device)
    longest = max(f.shape[0] for f in feats)
    padded = torch.zeros(len(feats), longest, feats[0].shape[1])
    mask = torch.zeros(len(feats), longest, dtype=torch.bool)
    for i, f in enumerate(feats):
        padded[i, : f.shape[0]], mask[i, : f.shape[0]] = f, True
    cond = Condition(padded, mask).to(device)
    sigmas = schedule(spec.inference_sigmas(num_steps, shape))
    return euler_rollout(lambda x, s: spec.velocity(model, x, s, cond), noise, sigmas)


def validation_features(cfg) -> list[torch.Tensor]:
    """The cached validation prompts of the main shards, then the first `anchor.val_prompts` of the
    anchor set's (so that forgetting shows in the grid during training)."""
    from .data.format import find_val_prompts, load_val_prompts

    feats: list[torch.Tensor] = []
    path = find_val_prompts(cfg.data.path, cfg.data.val_features)
    if path is not None:
        feats += load_val_prompts(path)[1]
    anchor = find_val_prompts(cfg.anchor.path, None) if cfg.anchor.path and cfg.anchor.val_prompts else None
    if anchor is not None:
        feats += load_val_prompts(anchor)[1][: cfg.anchor.val_prompts]
    return feats


def validation_size(cfg, manifest, spec: ModelSpec) -> tuple[int, int]:
    """metrics.val_height/width, else the first bucket of the feature shards."""
    if cfg.metrics.val_height and cfg.metrics.val_width:
        return cfg.metrics.val_height, cfg.metrics.val_width
    buckets = manifest.producer.get("buckets") or [[spec.default_size] * 2]
    return int(buckets[0][0]), int(buckets[0][1])


# ---- training pairs: student and teacher side by side -------------------------------------------------
def read_samples(data_path: str, count: int, manifest: Optional[str] = None) -> list:
    """The first `count` readable samples of the feature shards, in manifest order (no shuffle, so
    the same ones every time); unreadable samples are skipped with a warning."""
    from .data.format import FeatureFormatError, decode_sample
    from .data.shards import iter_tar_samples, resolve_shards

    out = []
    for url in resolve_shards(data_path, manifest).urls:
        for raw in iter_tar_samples(url, on_error=lambda err, u=url: log.warning("%s: %s", u, err)):
            try:
                out.append(decode_sample(raw))
            except FeatureFormatError as err:
                log.warning("skipped: %s", err)
                continue
            if len(out) >= count:
                return out
    return out


def batch_samples(samples: list, batch_size: int) -> list:
    """Bucket-homogeneous batches (buckets in first-seen order) of at most `batch_size` samples."""
    from .data.reader import collate

    groups: dict = defaultdict(list)
    for sample in samples:
        groups[sample.bucket].append(sample)
    return [collate(group[i : i + batch_size]) for group in groups.values() for i in range(0, len(group), batch_size)]


def read_pairs(data_path: str, count: int = VAL_PAIRS, manifest: Optional[str] = None):
    """`count` training samples of one bucket (the commonest among the first 4 * count) as a Batch
    holding both conditions and, when cached, the target latents; None without samples."""
    samples = read_samples(data_path, 4 * count, manifest)
    if not samples:
        return None
    batches = batch_samples(samples, count)
    return max(batches, key=len)


def branch_noise(spec: ModelSpec, bucket: tuple[int, int], n: int, seed: int, first: int = 0) -> torch.Tensor:
    """Per-sample noise keyed by (seed, sample index): independent of how samples are batched."""
    shape = spec.latent_shape(*bucket)
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + first + i)) for i in range(n)]
    )


@torch.no_grad()
def rollout_branches(
    spec: ModelSpec,
    model: nn.Module,
    batch,
    num_steps: int,
    noise: torch.Tensor,
    device: torch.device,
    teacher: Optional[nn.Module] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) final latents from the same noise on the model's few-step schedule: the
    student network on the prompt, the teacher network (default: the same one) on its context."""
    sigmas = schedule(spec.inference_sigmas(num_steps, tuple(noise.shape[1:])))
    noise = noise.to(device)
    student_cond, teacher_cond = batch.student.to(device), batch.teacher.to(device)
    teacher = model if teacher is None else teacher
    student = euler_rollout(lambda x, s: spec.velocity(model, x, s, student_cond), noise, sigmas)
    taught = euler_rollout(lambda x, s: spec.velocity(teacher, x, s, teacher_cond), noise, sigmas)
    return student, taught


def branches_grid(
    spec: ModelSpec, batch, student: torch.Tensor, teacher: torch.Tensor, device: torch.device
) -> Image.Image:
    """One row per sample: target (when the shards hold latents) | student | teacher."""
    columns = [spec.to_images(student, device).cpu(), spec.to_images(teacher, device).cpu()]
    if batch.latents is not None:
        columns.insert(0, spec.to_images(batch.latents, device).cpu())
    return images_to_grid(torch.stack(columns, dim=1).flatten(0, 1), columns=len(columns))


@torch.no_grad()
def run_validation(
    spec: ModelSpec,
    model: nn.Module,
    cfg,
    manifest,
    device: torch.device,
    autocast,
    step: int,
    run_dir: Path,
    is_main: bool,
    pairs=None,
    teacher: Optional[nn.Module] = None,
    logger=None,
) -> Optional[Path]:
    """Every rank rolls out (a sharded model's forward is collective); rank 0 decodes and saves.

    `pairs` (a Batch from `read_pairs`) adds the student | teacher grid, with the `teacher` network
    (the EMA teacher; default: the student itself); `logger` (a MetricsLogger) sends the grids to
    TensorBoard. Returns the prompt grid's path (the pairs grid's when there are no prompts).
    """
    feats = validation_features(cfg)
    if not feats and pairs is None:
        return None
    height, width = validation_size(cfg, manifest, spec)
    was_training = model.training
    model.eval()
    latents, branches = None, None
    with autocast:
        if feats:
            latents = sample_latents(
                spec, model, feats, height, width, cfg.metrics.val_steps, cfg.metrics.val_seed, device
            )
        if pairs is not None:
            noise = branch_noise(spec, pairs.bucket, len(pairs), cfg.metrics.val_seed)
            branches = rollout_branches(spec, model, pairs, cfg.metrics.val_steps, noise, device, teacher)
    model.train(was_training)
    if not is_main:
        return None
    paths = []
    if latents is not None:
        grid = images_to_grid(spec.to_images(latents, device))
        paths.append(save_grid(grid, run_dir, step))
        if logger is not None:
            logger.image("validation/student", grid, step)
    if branches is not None:
        grid = branches_grid(spec, pairs, *branches, device)
        paths.append(save_grid(grid, run_dir, step, kind="student_teacher"))
        if logger is not None:
            logger.image("validation/target_student_teacher", grid, step)
    return paths[0]


def save_grid(grid: Image.Image, run_dir: str | Path, step: int, kind: str = "") -> Path:
    """`validation/step_N.png`, or `validation/<kind>/step_N.png` for another grid of the step."""
    folder = Path(run_dir) / "validation"
    path = (folder / kind if kind else folder) / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
