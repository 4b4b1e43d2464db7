"""Z-Image (ZImageTransformer2DModel): conventions, packing, FLOPs and the debug flavor.

Z-Image's network is fed the model time `t = 1 - sigma` and predicts `-v` (ZImagePipeline
negates its output before the Euler step), on latents [C, 1, h, w] per sample, with the caption
features as a list of unpadded [L_i, D] tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from torch import nn

from ..flow import shift_sigmas
from .spec import Condition, ModelSpec, read_json

# Z-Image pads the caption sequence to a multiple of this inside the model.
CAPTION_MULTIPLE = 32
# Training roll-out of the public reference code for Z-Image-Turbo (inference keeps 8 NFE): it is
# the pipeline's own 4-step schedule (linspace(1, 1/4, 4) shifted by 3), i.e. every other sigma of
# the 8-step one, which is why the default for any K is the pipeline's K-step schedule.
REFERENCE_TRAIN_SIGMAS = (1.0, 0.9, 0.75, 0.5)

DEBUG_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=4,
    dim=32,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=32,
    axes_dims=[4, 6, 6],
    axes_lens=[256, 64, 64],
)


class ZImageSpec(ModelSpec):
    name = "zimage"
    transformer_class = ZImageTransformer2DModel
    default_context = "vlm"
    attention_backends = ("sdpa", "triton", "flash_attn")
    # The main stack `layers.N` only: attention (to_out is a ModuleList, `.0` its Linear) and the
    # SwiGLU MLP. A suffix list would also hit the noise/context refiners (the same block class).
    lora_target_modules = r"^layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))$"
    lora_pipeline = "ZImagePipeline"

    def __init__(self, path: str | Path):
        super().__init__(path)
        vae_cfg = self._component_config("vae", "config.json")
        self.vae_scale_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1) if vae_cfg else 8
        transformer_cfg = read_json(self.transformer_dir / "config.json")
        self.latent_channels = transformer_cfg.get("in_channels", 16)
        self.patch_size = int(transformer_cfg.get("all_patch_size", [2])[0])
        self.scheduler_config = self._component_config("scheduler", "scheduler_config.json") or {
            "num_train_timesteps": 1000,
            "shift": 3.0,
            "use_dynamic_shifting": False,
        }
        # The pipeline's default image size: 1024^2 for the real model, 64 px per vae factor unit.
        self.default_size = 128 * self.vae_scale_factor

    def _component_config(self, folder: str, name: str) -> dict | None:
        path = self.path / folder / name
        return read_json(path) if self.is_pipeline and path.is_file() else None

    def feature_dim(self, model: nn.Module) -> int:
        return int(model.config.cap_feat_dim)

    # ---- caching -------------------------------------------------------------------------
    def prompt_encoder(self, device: str = "cpu", max_length: Optional[int] = None):
        from ..encoders.text import PromptEncoder

        return PromptEncoder.from_pipeline(self.path, device=device, max_length=max_length or 512)

    def latent_encoder(self, device: str = "cpu"):
        from ..encoders.latents import VAELatentEncoder

        if not (self.path / "vae").is_dir():
            raise FileNotFoundError(f"{self.path}: no vae/ folder, cannot encode latents")
        return VAELatentEncoder(self.path / "vae", device)

    # ---- conventions ---------------------------------------------------------------------
    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        t = (1.0 - sigma).to(dtype)
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))
        captions = [c.to(dtype) for c in cond.unpadded()]
        out = model(latents, t, captions, patch_size=self.patch_size, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2).to(x.dtype)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        unit = self.vae_scale_factor * self.patch_size  # VAE downsampling times the patch
        if height % unit or width % unit:
            raise ValueError(f"image size {height}x{width} must be a multiple of {unit} for this model")
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def inference_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> list[float]:
        """Exactly what ZImagePipeline computes: its default sigmas through its scheduler."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        base = torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = _resolution_shift(latent_shape, scheduler.config)
        scheduler.set_timesteps(sigmas=base, **kwargs)
        return scheduler.sigmas[:-1].tolist()

    def shifted_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        return shift_sigmas(u, float(self.scheduler_config.get("shift", 3.0)))

    def decode(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        cfg = vae.config
        z = latents.to(vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ---- parallelism and accounting -----------------------------------------------------
    def sharding_units(self, model: nn.Module) -> list[nn.Module]:
        return [*model.noise_refiner, *model.context_refiner, *model.layers]

    def flops_per_forward(
        self, model: nn.Module, latent_shape: tuple[int, int, int], cond_len: int, ref_tokens: int = 0
    ) -> float:
        """2 * params * tokens for every linear layer plus 4 * N^2 * dim per attention."""
        c, h, w = latent_shape
        p = self.patch_size
        n_img = (h // p) * (w // p)
        n_cap = -(-cond_len // CAPTION_MULTIPLE) * CAPTION_MULTIPLE
        dim = model.config.dim

        def group(blocks: nn.ModuleList, n: int) -> float:
            params = sum(p.numel() for b in blocks for p in b.parameters())
            return 2.0 * params * n + 4.0 * n * n * dim * len(blocks)

        blocks = group(model.noise_refiner, n_img) + group(model.context_refiner, n_cap)
        blocks += group(model.layers, n_img + n_cap)
        embed = 2.0 * dim * (c * p * p) * n_img * 2 + 2.0 * model.config.cap_feat_dim * dim * n_cap
        return blocks + embed


def _resolution_shift(latent_shape: tuple[int, int, int], cfg: dict) -> float:
    """The pipeline's `calculate_shift`: mu linear in the image token count."""
    seq = (latent_shape[1] // 2) * (latent_shape[2] // 2)
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq * m + base_shift - m * base_len


def build_debug_transformer(seed: int = 0, cap_feat_dim: int = 32) -> ZImageTransformer2DModel:
    """The `debug` flavor: the real class with a tiny config and random weights."""
    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**{**DEBUG_TRANSFORMER, "cap_feat_dim": cap_feat_dim})
    # diffusers zero-initialises some output layers; random weights everywhere make tests meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model
