"""FLUX.2 caching encoders: Qwen3 prompt features and the patchified, BatchNorm-normalised latents.

Both reproduce `Flux2KleinPipeline` exactly (diffusers 0.42.1):

- text: the prompt in a user turn of the chat template with `enable_thinking=False` (the real Qwen3
  template then renders an empty `<think>` block), padded to `max_length` (512) on the tokenizer's
  side, and the hidden states of `text_encoder_out_layers` (9, 18, 27) concatenated per token to
  [L, 3 * hidden]. The pads are KEPT: the DiT attends to all L tokens with no text mask, and a pad
  position's hidden state depends on the prompt, so stripping them would change the condition.
- latents: the VAE posterior mode, 2x2 patchify (channel `c * 4 + 2 * dy + dx`) and the VAE's
  BatchNorm running statistics: `(patchify(z) - mean) / sqrt(var + eps)`. This is the space the
  pipeline draws its noise in, so the project's latents are these [B, 4 * C_vae, H/16, W/16].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

DEFAULT_TEXT_LAYERS = (9, 18, 27)
"""`text_encoder_out_layers` of Flux2KleinPipeline: un-normed states of the 36-layer Qwen3."""


# ---- the latent space ---------------------------------------------------------------------------
def patchify(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], channel `c * 4 + 2 * dy + dx` (the pipeline's order)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """The exact inverse of :func:`patchify`."""
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def bn_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE BatchNorm's running mean and std (with the config's eps), shaped [1, 4C, 1, 1]."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def normalize(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """VAE latents [B, C, H, W] -> the project's latents [B, 4C, H/2, W/2]."""
    z = patchify(z)
    mean, std = bn_stats(vae, z)
    return (z - mean) / std


def denormalize(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The project's latents -> VAE latents (what `output_type="latent"` returns)."""
    mean, std = bn_stats(vae, latents)
    return unpatchify(latents * std + mean)


# ---- text ---------------------------------------------------------------------------------------
class Flux2PromptEncoder:
    """Prompts -> list of padded [max_length, len(layers) * hidden] features (the DiT's caption input)."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int = 512, layers: Sequence[int] = DEFAULT_TEXT_LAYERS):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = int(max_length)
        self.layers = tuple(int(k) for k in layers)
        depth = int(model.config.num_hidden_layers)
        if not self.layers or max(self.layers) > depth or min(self.layers) < 0:
            raise ValueError(
                f"text_encoder_out_layers {list(self.layers)} do not fit a text encoder with {depth} "
                f"layers (hidden_states[0..{depth}]); a small encoder needs a dopsd_klein.json naming "
                "its layers"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("the FLUX.2 prompt features are padded to max_length: the tokenizer needs a pad token")

    @classmethod
    def from_pipeline(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", **kw):
        """`tokenizer/` and `text_encoder/` of a pipeline directory."""
        from .text import load_pipeline_text_encoder

        return cls(*load_pipeline_text_encoder(path, dtype, device), **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return len(self.layers) * int(self.model.config.hidden_size)

    def describe(self) -> dict:
        """Everything that changes the features (recorded in the feature manifest)."""
        return {
            "kind": "flux2_qwen3",
            "template": "chat/user",
            "enable_thinking": False,
            "hidden_layers": list(self.layers),
            "max_length": self.max_length,
            "padding": "max_length",
            "padding_side": self.tokenizer.padding_side,
            "pads": "kept (no text mask)",
        }

    def texts(self, prompts: Sequence[str]) -> list[str]:
        """The rendered chat texts (the pipeline's `_get_qwen3_prompt_embeds`)."""
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for p in prompts
        ]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        enc = self.tokenizer(
            self.texts(prompts), return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_length
        )
        out = self.model(
            input_ids=enc.input_ids.to(self.device),
            attention_mask=enc.attention_mask.to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        stacked = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)  # [B, layers, L, D]
        b, n, length, d = stacked.shape
        feats = stacked.permute(0, 2, 1, 3).reshape(b, length, n * d)  # per token [h_a | h_b | h_c]
        return list(feats.float().cpu().unbind(0))


# ---- images -------------------------------------------------------------------------------------
class Flux2LatentEncoder:
    """AutoencoderKLFlux2: images (cropped to their bucket) -> normalised latents [B, 4C, H/16, W/16]."""

    def __init__(self, vae_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKLFlux2
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        self.path = Path(vae_dir)
        self.vae = AutoencoderKLFlux2.from_pretrained(str(self.path), dtype=dtype).to(device).eval()
        self.unit = 2 ** len(self.vae.config.block_out_channels)  # VAE factor x the 2x2 patch
        self.processor = Flux2ImageProcessor(vae_scale_factor=self.unit)

    def describe(self) -> dict:
        return {
            "kind": "flux2_vae",
            "posterior": "mode",
            "patchify": 2,
            "normalize": "bn_running_stats",
            "batch_norm_eps": float(self.vae.config.batch_norm_eps),
            "pixels": "Flux2ImageProcessor [-1, 1]",
        }

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] exactly as the pipeline preprocesses a reference (its centre crop
        is a no-op on bucket-cropped images; its array layout gives bit-identical VAE convolutions)."""
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise ValueError(f"one call encodes images of one size (one bucket), got {sorted(sizes)}")
        width, height = sizes.pop()
        if width % self.unit or height % self.unit:
            raise ValueError(f"image size {width}x{height} must be a multiple of {self.unit} (crop to the bucket)")
        return self.processor.preprocess(images, height=height, width=width, resize_mode="crop")

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        x = self.pixels(images).to(self.vae.device, self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mode()
        return normalize(self.vae, z).float().cpu()
