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

    `feats` [B, L, D] with `mask` [B, L] (True = real token); `ref_latents` [B, R, C, h, w] holds
    R reference images' latents per sample for contexts that show the teacher images
    (FLUX.2 `edit_reference` appends them as tokens; the toy world as input channels).
    """

    feats: torch.Tensor
    mask: torch.Tensor
    ref_latents: Optional[torch.Tensor] = None
    sizes: Optional[tuple[int, ...]] = None
    """The per-sample lengths on the host, when known (the reader sets them): unpadding then slices
    without reading the mask back from the device (one sync per sample on a GPU)."""

    def to(
        self, device: torch.device | str, dtype: Optional[torch.dtype] = None, non_blocking: bool = False
    ) -> Condition:
        ref = self.ref_latents
        return Condition(
            feats=self.feats.to(device=device, dtype=dtype or self.feats.dtype, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            ref_latents=None
            if ref is None
            else ref.to(device=device, dtype=dtype or ref.dtype, non_blocking=non_blocking),
            sizes=self.sizes,
        )

    def pin_memory(self) -> Condition:
        ref = self.ref_latents
        return Condition(
            self.feats.pin_memory(), self.mask.pin_memory(), None if ref is None else ref.pin_memory(), self.sizes
        )

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def unpadded(self) -> list[torch.Tensor]:
        """Per-sample [L_i, D] features with the padding removed."""
        if self.sizes is not None:
            return [f[:n] for f, n in zip(self.feats, self.sizes)]
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
    default_context: str = "prompt"
    """The teacher context of the family's recipe (what `cache-features` builds by default)."""
    accepts_reference_latents: bool = False
    """Whether `velocity` can take `Condition.ref_latents` (contexts with reference images)."""
    sample_steps: int = 8
    """The family's few-step inference setting (Z-Image-Turbo: 8; FLUX.2-klein: 4)."""
    ref_patch_area: int = 1
    """Latent pixels per token of a reference image (FLUX.2 latents are already patchified: 1)."""
    attention_backends: tuple[str, ...] = ("sdpa", "flash_attn")
    """`model.attention_backend` values this family supports (our Triton processor: Z-Image's attention)."""
    default_size: int = 1024
    lora_target_modules: str = ""
    """Regex (peft full match on module names) of the Linears that get LoRA adapters by default:
    the attention projections and MLPs of the main blocks."""
    lora_pipeline: str = ""
    """The diffusers pipeline class whose `save_lora_weights` / `load_lora_weights` own the
    family's LoRA file (`transformer.<module>.lora_A.weight` keys)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"model directory not found: {self.path}")
        self.is_pipeline = is_pipeline_dir(self.path)
        sub = self.path / "transformer"
        self.transformer_dir = sub if self.is_pipeline or (sub / "config.json").is_file() else self.path
        if not (self.transformer_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.transformer_dir}: no config.json, not a diffusers transformer")

    # ---- loading -------------------------------------------------------------------------
    def load_transformer(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return self.transformer_class.from_pretrained(str(self.transformer_dir), dtype=dtype)

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

    def feature_dim(self, model: nn.Module) -> int:
        """Width of the caption features the DiT reads (what the feature shards must hold)."""
        raise NotImplementedError

    # ---- caching (used by the data tools, never in the training step) -----------------------
    def prompt_encoder(self, device: str = "cpu", max_length: Optional[int] = None):
        """The student's prompt encoder: the family's own text features, as its pipeline computes them."""
        raise NotImplementedError

    def latent_encoder(self, device: str = "cpu"):
        """Images (cropped to their bucket) -> the DiT's latents, in the family's convention."""
        raise NotImplementedError

    # ---- conventions ---------------------------------------------------------------------
    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The model's prediction as the project's velocity `eps - x0` at noise level `sigma` [B]."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def train_sigmas(
        self, num_steps: int, latent_shape: Optional[tuple[int, int, int]] = None, schedule: str = "pipeline"
    ) -> list[float]:
        """The roll-out schedule sigma_0..sigma_{K-1} of D-OPSD training for one bucket (default: the
        default size). `pipeline`: the model's own K-step inference schedule, so the training
        states lie on the inference trajectory (on-policy); `reference`: the public reference
        code's, for reproduction (the same for Z-Image; not for FLUX.2-klein)."""
        shape = latent_shape or self.latent_shape(self.default_size, self.default_size)
        if schedule == "reference":
            return self.reference_train_sigmas(num_steps, shape)
        return self.inference_sigmas(num_steps, shape)

    def reference_train_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> list[float]:
        """The reference code's training schedule (default: the inference schedule)."""
        return self.inference_sigmas(num_steps, latent_shape)

    def check_student_features(self, record: dict) -> Optional[str]:
        """Why features recorded as `record` (the manifest's `student_encoder`) cannot condition this
        model (None when they can): e.g. another text length or other hidden layers."""
        return None

    def inference_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> list[float]:
        """The stock pipeline's schedule sigma_0..sigma_{n-1} (0 is appended by the caller)."""
        raise NotImplementedError

    def shifted_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """Uniform u in [0, 1] -> noise levels through the model's time shift (SFT sampling)."""
        raise NotImplementedError

    def decode(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], [B, 3, H, W]."""
        raise NotImplementedError

    def to_images(self, latents: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Latents -> images in [0, 1] for grids: through the VAE, else a preview of the latents."""
        vae = self.load_vae()
        if vae is None:
            x = latents[:, :3].float()
            lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
            return (x - lo) / (hi - lo + 1e-8)
        return self.decode(vae.to(device), latents.to(device))

    # ---- parallelism and accounting -----------------------------------------------------
    def sharding_units(self, model: nn.Module) -> list[nn.Module]:
        """Submodules that FSDP shards one by one and that activation checkpointing wraps."""
        raise NotImplementedError

    def flops_per_forward(
        self, model: nn.Module, latent_shape: tuple[int, int, int], cond_len: int, ref_tokens: int = 0
    ) -> float:
        """Matmul FLOPs of one forward pass for one sample (`ref_tokens`: reference image tokens
        appended to the sequence, for families that take references as tokens)."""
        raise NotImplementedError

    # ---- generation ----------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str],
        steps: Optional[int] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: int = 0,
        transformer: Optional[nn.Module] = None,
    ) -> list:
        """PIL images from the stock diffusers pipeline of this directory (guidance off), one
        generator per prompt (`seed + i`); `transformer` replaces the pipeline's own."""
        pipe = self.pipeline(transformer)
        size = self.default_size
        generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
        # a copy: ZImagePipeline applies its chat template to the caller's list in place
        return pipe(
            prompt=list(prompts),
            height=height or size,
            width=width or size,
            num_inference_steps=steps or self.sample_steps,
            generator=generators,
            **self.pipeline_kwargs,
        ).images

    @property
    def pipeline_kwargs(self) -> dict:
        """What the stock pipeline's call needs beyond prompts and sizes to sample like training
        conditions (no guidance)."""
        return {"guidance_scale": 0.0}

    def pipeline(self, transformer: Optional[nn.Module] = None, dtype: Optional[torch.dtype] = None):
        """The stock diffusers pipeline this directory names, on the GPU when there is one;
        `transformer` replaces its own."""
        import diffusers

        index = self.path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{self.path}: sampling needs a whole pipeline directory (model_index.json)")
        pipe_cls = getattr(diffusers, read_json(index)["_class_name"])
        kwargs = {"transformer": transformer} if transformer is not None else {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        pipe = pipe_cls.from_pretrained(str(self.path), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to("cuda" if torch.cuda.is_available() else "cpu")

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
