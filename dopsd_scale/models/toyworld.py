"""The toy world's spec: Z-Image's DiT in pixel space, the reference image as input channels.

A toy model directory (see `dopsd_scale.toyworld.base`) holds `transformer/`, `text_encoder/`,
`tokenizer/` and `toyworld.json`; there is no VAE (latents are pixels in [-1, 1]) and no stock
diffusers pipeline: sampling runs the spec's own Euler sampler on the same schedule. The
conventions are Z-Image's (`t = 1 - sigma`, output `-v`, shift 3), so everything the trainer does
for Z-Image it does here unchanged. The teacher's context arrives as `Condition.ref_latents`
[B, 1, 3, H, W] (the recoloured silhouette of the target) and is packed as channels
[noisy | reference | flag]; the student gets zeros and flag 0.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..flow import shift_sigmas
from .spec import Condition
from .zimage import ZImageSpec


class ToyWorldSpec(ZImageSpec):
    name = "toyworld"
    default_context = "silhouette_reference"
    accepts_reference_latents = True

    def __init__(self, path: str | Path):
        from ..toyworld.base import IMAGE_CHANNELS, REFERENCE_MODES, read_world

        self.world = read_world(path)
        super().__init__(path)
        if self.world.get("reference") not in REFERENCE_MODES:
            raise ValueError(
                f"{path}: toyworld.json reference {self.world.get('reference')!r} is not one of "
                f"{', '.join(REFERENCE_MODES)}"
            )
        self.is_pipeline = False  # no stock pipeline: `transformer/` sits beside the encoders
        self.transformer_dir = self.path / "transformer"
        self.image_channels = IMAGE_CHANNELS
        self.vae_scale_factor = 1
        self.default_size = int(self.world["image_size"])
        self.shift = float(self.world["shift"])
        self.sample_steps = int(self.world["sample_steps"])
        self.reference_style = self.world.get("reference_style", "random_colours")

    def latent_encoder(self, device: str = "cpu"):
        from ..encoders.latents import PixelLatentEncoder

        return PixelLatentEncoder()

    # ---- conventions ---------------------------------------------------------------------
    def pack(self, x: torch.Tensor, cond: Condition) -> torch.Tensor:
        """[noisy 3 | reference 3 | flag 1] per pixel; zeros and flag 0 without a reference."""
        b, _, h, w = x.shape
        ref = cond.ref_latents
        if ref is None:
            extra = x.new_zeros(b, self.image_channels + 1, h, w)
        else:
            flag = x.new_ones(b, 1, h, w)
            extra = torch.cat([ref[:, 0].to(x.dtype), flag], dim=1)
        return torch.cat([x, extra], dim=1)

    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        v = super().velocity(model, self.pack(x, cond), sigma, cond)
        return v[:, : self.image_channels]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} must be a multiple of {self.patch_size}")
        return (self.image_channels, height, width)

    def inference_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> list[float]:
        base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
        return shift_sigmas(base, self.shift).tolist()

    def shifted_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        return shift_sigmas(u, self.shift)

    def load_vae(self, dtype: torch.dtype = torch.float32):
        return None

    def to_images(self, latents: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Pixels in [-1, 1] -> images in [0, 1]."""
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def flops_per_forward(
        self, model: nn.Module, latent_shape: tuple[int, int, int], cond_len: int, ref_tokens: int = 0
    ) -> float:
        """The reference is channels, not tokens: the same count with or without it."""
        c, h, w = latent_shape
        return super().flops_per_forward(model, (model.config.in_channels, h, w), cond_len)

    def generate(
        self,
        prompts: list[str],
        steps: Optional[int] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: int = 0,
        transformer: Optional[nn.Module] = None,
    ) -> list:
        """The toy sampler (no stock pipeline): each prompt from its own noise (`seed + i`)."""
        from ..toyworld.evaluate import ToyModel, generate
        from ..toyworld.world import to_pil

        toy = ToyModel.load(self.path, model=transformer)
        images = [generate(toy, [p], seed=seed + i, steps=steps) for i, p in enumerate(prompts)]
        return [to_pil(im[0]) for im in images]

    # ---- export --------------------------------------------------------------------------
    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        """The whole toy directory (encoders, world file) with this transformer."""
        out = Path(out_dir)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(self.path, out, ignore=shutil.ignore_patterns("transformer"))
        model.save_pretrained(str(out / "transformer"), safe_serialization=True)
        return out / "transformer"
