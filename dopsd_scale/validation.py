"""Validation grids: fixed prompts sampled few-step by the student from fixed noise.

The prompts' features come cached (val_prompts.safetensors), so no encoder is loaded; the VAE
decodes the latents when the model directory has one, else the first latent channels are shown.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from .flow import euler_rollout, schedule
from .models.spec import Condition, ModelSpec


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


def latents_preview(latents: torch.Tensor) -> torch.Tensor:
    """Without a VAE: the first three latent channels, min-max scaled, as an image."""
    x = latents[:, :3].float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo + 1e-8)


@torch.no_grad()
def sample_latents(spec: ModelSpec, model: nn.Module, feats: list[torch.Tensor], height: int, width: int,
                   num_steps: int, seed: int, device: torch.device) -> torch.Tensor:
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


def validation_size(cfg, manifest, spec: ModelSpec) -> tuple[int, int]:
    """metrics.val_height/width, else the first bucket of the feature shards."""
    if cfg.metrics.val_height and cfg.metrics.val_width:
        return cfg.metrics.val_height, cfg.metrics.val_width
    buckets = manifest.producer.get("buckets") or [[spec.default_size] * 2]
    return int(buckets[0][0]), int(buckets[0][1])


@torch.no_grad()
def run_validation(spec: ModelSpec, model: nn.Module, cfg, manifest, device: torch.device, autocast,
                   step: int, run_dir: Path, is_main: bool) -> Optional[Path]:
    """Every rank rolls out (a sharded model's forward is collective); rank 0 decodes and saves."""
    from .data.format import find_val_prompts, load_val_prompts

    path = find_val_prompts(cfg.data.path, cfg.data.val_features)
    if path is None:
        return None
    _, feats = load_val_prompts(path)
    height, width = validation_size(cfg, manifest, spec)
    was_training = model.training
    model.eval()
    with autocast:
        latents = sample_latents(spec, model, feats, height, width, cfg.metrics.val_steps,
                                 cfg.metrics.val_seed, device)
    model.train(was_training)
    if not is_main:
        return None
    vae = spec.load_vae()
    images = spec.decode(vae.to(device), latents) if vae is not None else latents_preview(latents)
    return save_grid(images_to_grid(images), run_dir, step)


def save_grid(grid: Image.Image, run_dir: str | Path, step: int) -> Path:
    path = Path(run_dir) / "validation" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
