"""Tiny random-weight flavors of the encoders (no downloads): Qwen3 text encoder and Qwen3-VL.

Their settings mirror the real pair where it matters for the graft (same vocabulary, rotary
base, norm epsilon, layer layout), at a hidden size of 32.
"""

from __future__ import annotations

import torch
from transformers import (
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3Model,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

DEBUG_HIDDEN = 32
_TEXT = dict(
    hidden_size=DEBUG_HIDDEN,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)
_ROPE_THETA = 1_000_000.0
# Debug images are small: 32^2..64^2 pixels instead of 512^2..768^2.
DEBUG_MIN_PIXELS, DEBUG_MAX_PIXELS = 32 * 32, 64 * 64


def build_debug_text_encoder(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> Qwen3Model:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, rope_theta=_ROPE_THETA, **_TEXT)
    return Qwen3Model(cfg).eval()


def build_debug_vlm(tokenizer: PreTrainedTokenizerBase, seed: int = 1) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(seed)
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": _ROPE_THETA,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        **_TEXT,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=DEBUG_HIDDEN,
        num_position_embeddings=64,
        deepstack_visual_indexes=[1],
    )
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen3VLForConditionalGeneration(cfg).eval()


def build_debug_image_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=DEBUG_MIN_PIXELS, max_pixels=DEBUG_MAX_PIXELS
    )
