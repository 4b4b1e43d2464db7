"""The `vlm` teacher context (Z-Image-Turbo recipe).

A Qwen3-VL whose language-model weights are replaced by Z-Image's text encoder, run on a user
turn [target image, prompt] without a system prompt; hidden_states[-2], at most 1024 tokens, the
image resized to 512^2..768^2 pixels. The DiT takes these features in its caption slot, so they
must live in the text encoder's feature space: that is what the graft buys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

IMAGE_TOKEN = "<|image_pad|>"

# Config fields that must agree between the text encoder and the VLM's language model,
# beyond the weights: otherwise text-only input cannot give the same hidden states.
_MATCHING_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "hidden_act",
)


class GraftError(ValueError):
    pass


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 0.0)))


def check_graft_compatible(text_model: PreTrainedModel, vlm: Qwen3VLForConditionalGeneration) -> None:
    """Weights alone do not make a graft: the non-weight settings must agree as well."""
    tc, vc = text_model.config, vlm.config.text_config
    for name in _MATCHING_FIELDS:
        a, b = getattr(tc, name, None), getattr(vc, name, None)
        if a != b:
            raise GraftError(f"cannot graft: text encoder {name}={a} but VLM language model {name}={b}")
    if _rope_theta(tc) != _rope_theta(vc):
        raise GraftError(f"cannot graft: rope_theta {_rope_theta(tc)} vs {_rope_theta(vc)}")
    rope = getattr(vc, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GraftError(f"cannot graft: VLM rope_type {rope.get('rope_type')} differs from plain RoPE")


def graft_language_model(vlm: Qwen3VLForConditionalGeneration, text_model: PreTrainedModel) -> None:
    """Copy the text encoder's weights into the VLM's language model, in place."""
    check_graft_compatible(text_model, vlm)
    target: nn.Module = vlm.model.language_model
    source = {k: v for k, v in text_model.state_dict().items() if not k.startswith("lm_head")}
    source = {k.removeprefix("model."): v for k, v in source.items()}
    own = target.state_dict()
    missing, extra = sorted(set(own) - set(source)), sorted(set(source) - set(own))
    if missing or extra:
        raise GraftError(f"cannot graft: missing {missing[:4]}, unexpected {extra[:4]}")
    with torch.no_grad():
        for key, value in source.items():
            if own[key].shape != value.shape:
                raise GraftError(f"cannot graft {key}: shape {tuple(value.shape)} vs {tuple(own[key].shape)}")
            own[key].copy_(value.to(own[key].dtype))


def check_tokenizers_agree(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> None:
    """The grafted embedding table is indexed by the text encoder's ids: vocabularies must match."""
    if a.get_vocab() != b.get_vocab():
        raise GraftError("cannot graft: the VLM tokenizer's vocabulary differs from the text encoder's")


class VLMTeacherContext:
    """(images, prompts) -> list of unpadded [L_i, D] multimodal features."""

    def __init__(
        self,
        model: Qwen3VLForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Qwen2VLImageProcessorPil,
        max_tokens: int = 1024,
        min_pixels: int = 512 * 512,
        max_pixels: int = 768 * 768,
        hidden_layer: int = -2,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_tokens = max_tokens
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.hidden_layer = hidden_layer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def from_pretrained(
        cls,
        vlm_path: str | Path,
        text_encoder: PreTrainedModel | None = None,
        text_tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        **kw,
    ) -> "VLMTeacherContext":
        """Load a Qwen3-VL directory and graft `text_encoder` into it (when given)."""
        model = Qwen3VLForConditionalGeneration.from_pretrained(str(vlm_path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(vlm_path))
        if text_encoder is not None:
            graft_language_model(model, text_encoder)
        if text_tokenizer is not None:
            check_tokenizers_agree(text_tokenizer, tokenizer)
        processor = Qwen2VLImageProcessorPil.from_pretrained(str(vlm_path))
        return cls(model.to(device), tokenizer, processor, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        return {
            "hidden_layer": self.hidden_layer,
            "max_tokens": self.max_tokens,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "template": "user:[image,prompt]",
        }

    def build_inputs(self, image: Image.Image | None, prompt: str) -> dict[str, torch.Tensor]:
        """Model inputs for one user turn; `image=None` gives the text-only turn."""
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        inputs: dict[str, torch.Tensor] = {}
        if image is not None:
            pixels = self.image_processor(
                images=[image.convert("RGB")],
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
                return_tensors="pt",
            )
            merge = self.image_processor.merge_size**2
            n_image_tokens = int(pixels["image_grid_thw"][0].prod()) // merge
            text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens, 1)
            inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        ids = self.tokenizer(text, return_tensors="pt").input_ids[:, : self.max_tokens]
        image_positions = ids == self.image_token_id
        if image is not None and int(image_positions.sum()) != n_image_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} would cut the image tokens ({n_image_tokens})")
        inputs.update(input_ids=ids, mm_token_type_ids=image_positions.long())
        return inputs

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[torch.Tensor]:
        """One sample at a time: image token counts differ, and batching VL inputs buys little."""
        feats = []
        for image, prompt in zip(images, prompts):
            inputs = {k: v.to(self.device) for k, v in self.build_inputs(image, prompt).items()}
            out = self.model(**inputs, output_hidden_states=True)
            feats.append(out.hidden_states[self.hidden_layer][0].float().cpu())
        return feats
