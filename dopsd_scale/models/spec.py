"""What the trainer needs to know about a DiT family, behind one small interface.

A :class:`ModelSpec` is built from a diffusers directory (a whole pipeline or a transformer
folder). It loads the transformer, translates the model's time and output conventions into the
project's (see :mod:`dopsd_scale.flow`), packs a :class:`Condition` into the model's inputs,
names the sharding units, counts FLOPs and exports. The trainer only talks to this interface, so
a new family (e.g. FLUX.2-klein, whose teacher context appends reference-image tokens) is a new
spec, not a change to the trainer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn


@dataclass
class Condition:
    """A padded batch of conditioning features for one branch (student or teacher).

    `feats` [B, L, D] with `mask` [B, L] (True = real token); `ref_latents` [B, C, h, w] holds
    reference-image latents for contexts that append image tokens (FLUX.2 `edit_reference`).
    """

    feats: torch.Tensor
    mask: torch.Tensor
    ref_latents: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "Condition":
        ref = self.ref_latents
        return Condition(
            feats=self.feats.to(device=device, dtype=dtype or self.feats.dtype),
            mask=self.mask.to(device),
            ref_latents=None if ref is None else ref.to(device=device, dtype=dtype or ref.dtype),
        )

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def unpadded(self) -> list[torch.Tensor]:
        """Per-sample [L_i, D] features with the padding removed."""
        return [f[m] for f, m in zip(self.feats, self.mask)]


def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ModelSpec:
    """Base class: a spec instance is bound to one model directory."""

    name: str = ""
    transformer_class: type[nn.Module]

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"model directory not found: {self.path}")
        self.is_pipeline = is_pipeline_dir(self.path)
        self.transformer_dir = self.path / "transformer" if self.is_pipeline else self.path
        if not (self.transformer_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.transformer_dir}: no config.json, not a diffusers transformer")

    # ---- loading -------------------------------------------------------------------------
    def load_transformer(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return self.transformer_class.from_pretrained(str(self.transformer_dir), torch_dtype=dtype)

    def load_transformer_from_config(self) -> nn.Module:
        """The architecture with fresh weights (e.g. on the meta device before loading a checkpoint)."""
        return self.transformer_class.from_config(self.transformer_class.load_config(str(self.transformer_dir)))

    def load_vae(self, dtype: torch.dtype = torch.float32) -> Optional[nn.Module]:
        """The pipeline's VAE (for validation images), or None for a bare transformer directory."""
        if not self.is_pipeline or not (self.path / "vae").is_dir():
            return None
        # loaded once per spec: validation asks for it every `metrics.val_every` steps
        if getattr(self, "_vae", None) is None or self._vae.dtype != dtype:
            from diffusers import AutoencoderKL

            self._vae = AutoencoderKL.from_pretrained(str(self.path / "vae"), torch_dtype=dtype).eval()
        return self._vae

    # ---- conventions ---------------------------------------------------------------------
    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The model's prediction as the project's velocity `eps - x0` at noise level `sigma` [B]."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def train_sigmas(self, num_steps: int) -> list[float]:
        """Default roll-out schedule sigma_0..sigma_{K-1} for D-OPSD training."""
        raise NotImplementedError

    def inference_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> list[float]:
        """The stock pipeline's schedule sigma_0..sigma_{n-1} (0 is appended by the caller)."""
        raise NotImplementedError

    def decode(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], [B, 3, H, W]."""
        raise NotImplementedError

    # ---- parallelism and accounting -----------------------------------------------------
    def sharding_units(self, model: nn.Module) -> list[nn.Module]:
        """Submodules that FSDP shards one by one and that activation checkpointing wraps."""
        raise NotImplementedError

    def flops_per_forward(self, model: nn.Module, latent_shape: tuple[int, int, int], cond_len: int) -> float:
        """Matmul FLOPs of one forward pass for one sample."""
        raise NotImplementedError

    # ---- export --------------------------------------------------------------------------
    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        """Write a diffusers-format directory; a whole pipeline when the base model is one.

        Returns the directory that holds the transformer.
        """
        out = Path(out_dir)
        if out.exists():
            shutil.rmtree(out)
        if self.is_pipeline:
            shutil.copytree(self.path, out, ignore=shutil.ignore_patterns("transformer"))
            target = out / "transformer"
        else:
            target = out
        model.save_pretrained(str(target), safe_serialization=True)
        return target
