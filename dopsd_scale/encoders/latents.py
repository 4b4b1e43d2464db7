"""Latent encoders for caching: images (already cropped to their bucket) -> the DiT's latents.

Each model family has its own convention; the model spec builds the right one
(`ModelSpec.latent_encoder`). The target latents (SFT, evaluation) and reference latents
(`edit_reference`) go through the same encoder, so they are the same pixels in the same space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pixels(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> [B, 3, H, W] in [-1, 1] (all images of one call share a size: one bucket)."""
    return torch.stack(
        [torch.from_numpy(np.asarray(i.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for i in images]
    )


class VAELatentEncoder:
    """AutoencoderKL with shift and scale (the FLUX.1 VAE Z-Image uses): `(mode - shift) * scale`."""

    def __init__(self, vae_dir: str | Path, device: str = "cpu"):
        from diffusers import AutoencoderKL

        self.path = Path(vae_dir)
        self.vae = AutoencoderKL.from_pretrained(str(self.path)).to(device).eval()

    def describe(self) -> dict:
        cfg = self.vae.config
        return {"kind": "vae", "posterior": "mode", "shift": cfg.shift_factor or 0.0, "scale": cfg.scaling_factor}

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        dist = self.vae.encode(pixels(images).to(self.vae.device, self.vae.dtype)).latent_dist
        cfg = self.vae.config
        return ((dist.mode() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).float().cpu()


class PixelLatentEncoder:
    """Pixel-space models (the toy world): the latents are the pixels in [-1, 1]."""

    def describe(self) -> dict:
        return {"kind": "pixels", "range": [-1, 1]}

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        return pixels(images)
