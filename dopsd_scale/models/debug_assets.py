"""The built-in tiny default: a whole Z-Image pipeline and a Qwen3-VL teacher, saved to disk.

`dopsd make-debug-models OUT` writes
  OUT/zimage/      ZImagePipeline layout: tokenizer, text_encoder, vae, scheduler, transformer
  OUT/teacher_vlm/ Qwen3-VL (tiny) with the same tokenizer and its image processor
  OUT/flux2_klein/ Flux2KleinPipeline layout (tiny), 64x64 images, references via edit_reference
Everything is loaded back through the same `from_pretrained` paths real checkpoints take.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline

from ..encoders.debug import build_debug_image_processor, build_debug_text_encoder, build_debug_vlm
from ..encoders.tokenizer import build_debug_tokenizer
from .debug_klein import make_debug_klein
from .zimage import build_debug_transformer

DEBUG_IMAGE_SIZE = 32  # pixels; vae factor 2 x patch 2 -> 8 x 8 image tokens


def build_debug_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DEBUG_IMAGE_SIZE,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()


def build_debug_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Z-Image-Turbo's scheduler settings.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def make_debug_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny pipeline and teacher VLM; returns their directories."""
    out = Path(out_dir)
    tokenizer = build_debug_tokenizer()
    text_encoder = build_debug_text_encoder(tokenizer, seed=seed)
    pipe = ZImagePipeline(
        scheduler=build_debug_scheduler(),
        vae=build_debug_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=build_debug_transformer(seed, cap_feat_dim=text_encoder.config.hidden_size),
    )
    pipe.save_pretrained(str(out / "zimage"))
    vlm_dir = out / "teacher_vlm"
    build_debug_vlm(tokenizer, seed=seed + 1).save_pretrained(str(vlm_dir))
    tokenizer.save_pretrained(str(vlm_dir))
    build_debug_image_processor().save_pretrained(str(vlm_dir))
    klein = make_debug_klein(out / "flux2_klein", seed=seed)
    return {"pipeline": out / "zimage", "teacher_vlm": vlm_dir, "klein": klein}
