"""The `debug` flavor of FLUX.2-klein: a whole tiny Flux2KleinPipeline with random weights.

`make_debug_klein(OUT)` writes a diffusers pipeline directory that loads through the same
`from_pretrained` paths as the real FLUX.2-klein-4B and keeps every convention that can be
silently wrong: a Qwen3ForCausalLM text encoder whose chosen layers (1, 2, 3 of 4) are un-normed
intermediate states like the real 9/18/27 of 36, a chat template that renders Qwen3's empty
`<think>` block for `enable_thinking=False`, a 4-level AutoencoderKLFlux2 (vae_scale_factor 8)
with non-trivial BatchNorm statistics, the klein scheduler (dynamic shifting) and
`is_distilled=True`. `dopsd_klein.json` names the layers (the real 36-layer encoder needs none)
and the 64 px default size. CPU forwards take milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from ..encoders.tokenizer import CHAT_TEMPLATE, build_debug_tokenizer
from .flux2_klein import DEFAULT_SCHEDULER, SETTINGS_FILE

DEBUG_KLEIN_SIZE = 64
"""Pixels per side of the debug images (the pipeline refuses references under 64 px): 4 x 4 tokens."""
TEXT_LAYERS = (1, 2, 3)
TEXT_HIDDEN = 32
LATENT_CHANNELS = 4  # VAE latent channels; the transformer sees 4 * 4 = 16 after the 2x2 patchify
# Qwen3's branch for enable_thinking=False after the generation prompt (the real template's).
THINK_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
)


def build_debug_klein_tokenizer():
    """The project's debug BPE with Qwen3's thinking branch in its chat template."""
    if THINK_TEMPLATE == CHAT_TEMPLATE:
        raise RuntimeError("the debug chat template changed: update THINK_TEMPLATE")
    tok = build_debug_tokenizer()
    tok.chat_template = THINK_TEMPLATE
    return tok


def build_debug_klein_text_encoder(tokenizer, seed: int = 0) -> Qwen3ForCausalLM:
    """4 layers, so hidden_states[1..3] are un-normed (transformers 5 norms only the last one)."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=len(TEXT_LAYERS) + 1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    )
    return Qwen3ForCausalLM(cfg).eval()


def build_debug_klein_transformer(seed: int = 0) -> Flux2Transformer2DModel:
    """Klein's block layout in miniature: 2 double + 3 single blocks, rope on 4 axes (t, h, w, l)."""
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=len(TEXT_LAYERS) * TEXT_HIDDEN,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=False,
    ).eval()
    _randomize_zeros(model)
    return model


def build_debug_klein_vae(seed: int = 0) -> AutoencoderKLFlux2:
    """4 levels (vae_scale_factor 8, like the real VAE), random BatchNorm running statistics."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=DEBUG_KLEIN_SIZE,
    ).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(4 * LATENT_CHANNELS, generator=gen) * 0.3)
        vae.bn.running_var.copy_(torch.rand(4 * LATENT_CHANNELS, generator=gen) + 0.5)
    _randomize_zeros(vae)
    return vae


def _randomize_zeros(model: torch.nn.Module) -> None:
    """diffusers zero-initialises some output layers; small random values make tests meaningful."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)


def make_debug_klein(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline (plus `dopsd_klein.json`) to `out_dir` and return it."""
    out = Path(out_dir)
    tokenizer = build_debug_klein_tokenizer()
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER),
        vae=build_debug_klein_vae(seed),
        text_encoder=build_debug_klein_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        transformer=build_debug_klein_transformer(seed),
        is_distilled=True,
    )
    pipe.save_pretrained(str(out))
    settings = {
        "text_encoder_out_layers": list(TEXT_LAYERS),
        "max_sequence_length": 512,
        "default_size": DEBUG_KLEIN_SIZE,
    }
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return out
