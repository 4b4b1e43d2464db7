"""FLUX.2-klein (Flux2Transformer2DModel): conventions, packing, schedules, FLOPs.

The project's latents for klein are the pipeline's own noise space: the VAE latents patchified
2x2 and normalised by the VAE's BatchNorm running statistics, [B, 128, H/16, W/16]
(:mod:`dopsd_scale.encoders.flux2`). The network is fed `timestep = sigma` (it multiplies by 1000
inside) and its output is already the project's velocity `eps - x0`: no sign flip, unlike Z-Image.
Tokens are packed row-major with position ids (t, row, col, l): (0, r, c, 0) for the noisy image,
(10 + 10 i, r, c, 0) for reference image i (the `edit_reference` teacher), (0, 0, 0, l) for the
caption. The caption is the whole padded sequence (512 tokens of [h9 | h18 | h27]) with no mask.
The model reads the ids of the first sample only, so a batch shares one layout.

A pipeline directory may hold `dopsd_klein.json` (the debug flavor writes one): the
`text_encoder_out_layers`, `max_sequence_length` and `default_size` that the pipeline must be
called with when they differ from the real model's (a 4-layer debug text encoder has no layer 27).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from torch import nn

from ..encoders.flux2 import DEFAULT_TEXT_LAYERS, denormalize
from .spec import Condition, ModelSpec, read_json

log = logging.getLogger(__name__)

SETTINGS_FILE = "dopsd_klein.json"
REFERENCE_T_OFFSET = 10
"""Reference image i gets the time coordinate 10 + 10 * i (`_prepare_image_ids`, scale 10)."""
DEFAULT_SAMPLE_SIZE = 128
"""`Flux2KleinPipeline.default_sample_size`: default pixels = 128 * vae_scale_factor (1024)."""
# `scheduler/scheduler_config.json` of the klein repos (FLUX.1-dev's, per the diffusers conversion
# script), used for a bare transformer directory.
DEFAULT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


class Flux2KleinSpec(ModelSpec):
    name = "flux2_klein"
    transformer_class = Flux2Transformer2DModel
    default_context = "edit_reference"
    accepts_reference_latents = True
    sample_steps = 4
    # Every Linear of the double blocks (image and text streams: attention and MLPs) and of the
    # single blocks (fused QKV+MLP-in, fused out). A bare suffix "to_out" would hit the double
    # blocks' to_out ModuleList (peft refuses it) and "linear" the modulation layers; the anchored
    # regex keeps `single_transformer_blocks` out of the `transformer_blocks` branch. (The reference
    # code's `ff.net.*` targets match nothing in diffusers' Flux2.)
    lora_target_modules = (
        r"^(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
        r"|ff\.(linear_in|linear_out)|ff_context\.(linear_in|linear_out))"
        r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))$"
    )
    lora_pipeline = "Flux2KleinPipeline"

    def __init__(self, path: str | Path):
        super().__init__(path)
        vae_cfg = self._component_config("vae", "config.json")
        self.vae_scale_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1) if vae_cfg else 8
        self.latent_channels = int(read_json(self.transformer_dir / "config.json").get("in_channels", 128))
        self.scheduler_config = self._component_config("scheduler", "scheduler_config.json") or dict(DEFAULT_SCHEDULER)
        settings = self._component_config(".", SETTINGS_FILE) or {}
        self.text_layers = tuple(settings.get("text_encoder_out_layers", DEFAULT_TEXT_LAYERS))
        self.max_sequence_length = int(settings.get("max_sequence_length", 512))
        self.default_size = int(settings.get("default_size", DEFAULT_SAMPLE_SIZE * self.vae_scale_factor))
        self._ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _component_config(self, folder: str, name: str) -> dict | None:
        path = self.path / folder / name
        return read_json(path) if self.is_pipeline and path.is_file() else None

    @property
    def pipeline_kwargs(self) -> dict:
        """What `Flux2KleinPipeline.__call__` must get to condition like our features (no CFG:
        guidance 1; the text length and layers of this directory)."""
        return {
            "max_sequence_length": self.max_sequence_length,
            "text_encoder_out_layers": self.text_layers,
            "guidance_scale": 1.0,
        }

    def feature_dim(self, model: nn.Module) -> int:
        return int(model.config.joint_attention_dim)

    def check_student_features(self, record: dict) -> Optional[str]:
        """The cached prompt features must be this pipeline's: same text length and hidden layers."""
        length, layers = record.get("max_length"), record.get("hidden_layers")
        if length != self.max_sequence_length or (layers is not None and tuple(layers) != self.text_layers):
            return (
                f"the features were cached with {length} tokens from layers {layers}; this pipeline conditions "
                f"on {self.max_sequence_length} tokens from layers {list(self.text_layers)}"
            )
        return None

    # ---- loading and caching ---------------------------------------------------------------
    def load_vae(self, dtype: torch.dtype = torch.float32) -> Optional[nn.Module]:
        if not self.is_pipeline or not (self.path / "vae").is_dir():
            return None
        if getattr(self, "_vae", None) is None or self._vae.dtype != dtype:
            from diffusers import AutoencoderKLFlux2

            self._vae = AutoencoderKLFlux2.from_pretrained(str(self.path / "vae"), dtype=dtype).eval()
        return self._vae

    def prompt_encoder(self, device: str = "cpu", max_length: Optional[int] = None):
        """The pipeline's padded text features; refuses another length than the pipeline's own, since
        the pads are part of the condition (a 256-token feature is not what the pipeline infers with)."""
        from ..encoders.flux2 import Flux2PromptEncoder

        max_length = max_length or self.max_sequence_length
        if max_length != self.max_sequence_length:
            raise ValueError(
                f"FLUX.2-klein conditions on {self.max_sequence_length} padded text tokens (pads "
                f"included, no mask); features of {max_length} tokens would not be the pipeline's"
            )
        return Flux2PromptEncoder.from_pipeline(
            self.path, device=device, max_length=max_length, layers=self.text_layers
        )

    def latent_encoder(self, device: str = "cpu"):
        from ..encoders.flux2 import Flux2LatentEncoder

        if not (self.path / "vae").is_dir():
            raise FileNotFoundError(f"{self.path}: no vae/ folder, cannot encode latents")
        return Flux2LatentEncoder(self.path / "vae", device)

    # ---- conventions -----------------------------------------------------------------------
    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        b, c, h, w = x.shape
        dtype = next(model.parameters()).dtype
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)
        refs = self._reference_tokens(cond.ref_latents, b, c)
        hidden = tokens if refs is None else torch.cat([tokens, refs.to(tokens.dtype)], dim=1)
        feats = self._caption(cond)
        img_ids, txt_ids = self._positions(x.device, feats.shape[1], (h, w), cond.ref_latents)
        # the pipeline's dtype round trip: `t = 1000 * sigma` in the latents' dtype, passed as t / 1000
        sigma = torch.as_tensor(sigma, device=x.device).float().expand(b)
        timestep = (1000.0 * sigma).to(_compute_dtype(model)) / 1000
        out = model(
            hidden_states=hidden.to(dtype),
            encoder_hidden_states=feats.to(dtype),
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None,
            return_dict=False,
        )[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w).to(x.dtype)

    def _caption(self, cond: Condition) -> torch.Tensor:
        """The whole padded caption: klein has no text mask, so a mask with False entries means the
        features were cached by a padding-stripping encoder (refused, not silently misread)."""
        feats, mask = cond.feats, cond.mask
        if feats.shape[1] != self.max_sequence_length:
            raise ValueError(
                f"FLUX.2-klein caption features must hold {self.max_sequence_length} tokens (padded, "
                f"pads kept), got {feats.shape[1]}: cache them with this spec's prompt encoder"
            )
        if mask is not None and mask.device.type == "cpu" and not bool(mask.all()):
            raise ValueError(
                "FLUX.2-klein reads every caption token (no text mask) but this batch's mask has "
                "padding: the features were cached by a padding-stripping encoder"
            )
        return feats

    def _reference_tokens(self, ref: Optional[torch.Tensor], b: int, c: int) -> Optional[torch.Tensor]:
        """[B, R, C, h, w] -> [B, R * h * w, C]: each reference packed row-major, in order."""
        if ref is None:
            return None
        if ref.ndim != 5 or ref.shape[0] != b or ref.shape[2] != c:
            raise ValueError(
                f"ref_latents must be [B={b}, R, C={c}, h, w] (every sample of a batch with the same "
                f"number of references), got {list(ref.shape)}"
            )
        return ref.permute(0, 1, 3, 4, 2).reshape(b, -1, c)

    def _positions(
        self, device: torch.device, text_len: int, grid: tuple[int, int], ref: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_ids [N (+ R * n), 4], txt_ids [L, 4]), int64 like the pipeline's, cached per layout."""
        refs = None if ref is None else (ref.shape[1], ref.shape[3], ref.shape[4])
        key = (str(device), text_len, grid, refs)
        if key not in self._ids:
            ids = [grid_ids(*grid, t=0)]
            if refs is not None:
                ids += [grid_ids(refs[1], refs[2], t=REFERENCE_T_OFFSET * (1 + i)) for i in range(refs[0])]
            txt = torch.zeros(text_len, 4, dtype=torch.long)
            txt[:, 3] = torch.arange(text_len)
            self._ids[key] = (torch.cat(ids).to(device), txt.to(device))
        return self._ids[key]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        unit = self.vae_scale_factor * 2  # VAE downsampling times the 2x2 patchify
        if height % unit or width % unit:
            raise ValueError(f"image size {height}x{width} must be a multiple of {unit} for this model")
        return (self.latent_channels, height // unit, width // unit)

    # ---- schedules -------------------------------------------------------------------------
    def mu(self, num_steps: int, latent_shape: tuple[int, int, int]) -> float:
        """The pipeline's resolution- and step-dependent shift (output tokens only, no references)."""
        return compute_empirical_mu(image_seq_len=latent_shape[1] * latent_shape[2], num_steps=num_steps)

    def _scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)

    def inference_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> list[float]:
        """Exactly Flux2KleinPipeline's: linspace(1, 1/n, n) through the scheduler with mu(N, n)."""
        import numpy as np

        scheduler = self._scheduler()
        base = np.linspace(1.0, 1.0 / num_steps, num_steps)
        scheduler.set_timesteps(sigmas=base, mu=self.mu(num_steps, latent_shape))
        return scheduler.sigmas[:-1].tolist()

    def reference_train_sigmas(self, num_steps: int, latent_shape: tuple[int, int, int]) -> list[float]:
        """The public reference code's roll-out: `set_timesteps(K, mu=...)` without sigmas, i.e.
        linspace(1, 1/1000, K) shifted (1024^2, K=4: 1, .952, .832, .0098), NOT the states the
        pipeline visits (1, .967, .908, .767). Offered for reproduction only."""
        scheduler = self._scheduler()
        scheduler.set_timesteps(num_steps, mu=self.mu(num_steps, latent_shape))
        return scheduler.sigmas[:-1].tolist()

    def shifted_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """The exponential time shift exp(mu) / (exp(mu) + 1/u - 1) with the default size's mu at
        `sample_steps` (written as e u / (e u + 1 - u), finite at u = 0)."""
        shape = self.latent_shape(self.default_size, self.default_size)
        e = math.exp(self.mu(self.sample_steps, shape))
        return e * u / (e * u + (1 - u))

    def decode(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        z = denormalize(vae, latents.to(vae.dtype))
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ---- parallelism and accounting -------------------------------------------------------
    def sharding_units(self, model: nn.Module) -> list[nn.Module]:
        return [*model.transformer_blocks, *model.single_transformer_blocks]

    def flops_per_forward(
        self, model: nn.Module, latent_shape: tuple[int, int, int], cond_len: int, ref_tokens: int = 0
    ) -> float:
        """Matmul FLOPs (2 per multiply-add) of one forward for one sample: every Linear on the tokens
        it sees plus 4 N^2 D per attention. `ref_tokens`: reference tokens appended (edit_reference)."""
        n_img = latent_shape[1] * latent_shape[2] + ref_tokens
        n_all = n_img + cond_len
        dim = model.config.num_attention_heads * model.config.attention_head_dim
        flops = 0.0
        for block in model.transformer_blocks:
            txt = _linear_params(block.ff_context)  # the text stream's weights see only the text tokens
            txt += sum(_linear_params(getattr(block.attn, n)) for n in _TEXT_PROJECTIONS)
            flops += 2.0 * ((_linear_params(block) - txt) * n_img + txt * cond_len) + 4.0 * n_all**2 * dim
        for block in model.single_transformer_blocks:
            flops += 2.0 * _linear_params(block) * n_all + 4.0 * n_all**2 * dim
        per_token = {"x_embedder": n_img, "proj_out": n_img, "context_embedder": cond_len}
        for name, module in model.named_children():
            if name not in ("transformer_blocks", "single_transformer_blocks"):
                flops += 2.0 * _linear_params(module) * per_token.get(name, 1)  # modulation: once per sample
        return flops


# the text stream's projections inside a double block's attention (the rest is the image stream's)
_TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the timestep is rounded through: the autocast dtype when autocast is on (bf16 runs
    then see the bf16 pipeline's timesteps), else the weights' dtype (FSDP2 bf16 casts it anyway)."""
    param = next(model.parameters())
    device_type = param.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param.dtype


def grid_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """Row-major (t, row, col, 0) ids of an h x w token grid, int64 [h * w, 4]."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1).reshape(-1, 4)
