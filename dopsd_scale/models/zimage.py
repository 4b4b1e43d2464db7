"""Z-Image (ZImageTransformer2DModel): conventions, packing, FLOPs and the debug flavor.

Z-Image's network is fed the model time `t = 1 - sigma` and predicts `-v` (ZImagePipeline
negates its output before the Euler step), on latents [C, 1, h, w] per sample, with the caption
features as a list of unpadded [L_i, D] tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from torch import nn

from .spec import Condition, ModelSpec, read_json

# Z-Image pads the caption sequence to a multiple of this inside the model.
CAPTION_MULTIPLE = 32
# Training roll-out of the public reference code for Z-Image-Turbo (inference keeps 8 NFE).
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

    def __init__(self, path: str | Path):
        super().__init__(path)
        vae_cfg = self._component_config("vae", "config.json")
        self.vae_scale_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1) if vae_cfg else 8
        self.latent_channels = read_json(self.transformer_dir / "config.json").get("in_channels", 16)
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

    # ---- conventions ---------------------------------------------------------------------
    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        t = (1.0 - sigma).to(dtype)
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))
        captions = [c.to(dtype) for c in cond.unpadded()]
        out = model(latents, t, captions, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2).to(x.dtype)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        unit = self.vae_scale_factor * 2  # VAE downsampling times the 2x2 patch
        if height % unit or width % unit:
            raise ValueError(f"image size {height}x{width} must be a multiple of {unit} for this model")
        return (self.latent_channels, 2 * (height // unit), 2 * (width // unit))

    def train_sigmas(self, num_steps: int) -> list[float]:
        if num_steps == len(REFERENCE_TRAIN_SIGMAS):
            return list(REFERENCE_TRAIN_SIGMAS)
        return torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()

    def inference_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> list[float]:
        """Exactly what ZImagePipeline computes: its default sigmas through its scheduler."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        base = torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = _resolution_shift(latent_shape, scheduler.config)
        scheduler.set_timesteps(sigmas=base, **kwargs)
        return scheduler.sigmas[:-1].tolist()

    def decode(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        cfg = vae.config
        z = latents.to(vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ---- parallelism and accounting -----------------------------------------------------
    def sharding_units(self, model: nn.Module) -> list[nn.Module]:
        return [*model.noise_refiner, *model.context_refiner, *model.layers]

    def flops_per_forward(self, model: nn.Module, latent_shape: tuple[int, int, int], cond_len: int) -> float:
        """2 * params * tokens for every linear layer plus 4 * N^2 * dim per attention."""
        c, h, w = latent_shape
        n_img = (h // 2) * (w // 2)
        n_cap = -(-cond_len // CAPTION_MULTIPLE) * CAPTION_MULTIPLE
        dim = model.config.dim

        def group(blocks: nn.ModuleList, n: int) -> float:
            params = sum(p.numel() for b in blocks for p in b.parameters())
            return 2.0 * params * n + 4.0 * n * n * dim * len(blocks)

        blocks = group(model.noise_refiner, n_img) + group(model.context_refiner, n_cap)
        blocks += group(model.layers, n_img + n_cap)
        embed = 2.0 * dim * (c * 4) * n_img * 2 + 2.0 * model.config.cap_feat_dim * dim * n_cap
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
