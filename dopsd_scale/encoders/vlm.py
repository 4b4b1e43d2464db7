"""The `vlm` teacher context (Z-Image-Turbo recipe).

A Qwen3-VL whose language-model weights are replaced by Z-Image's text encoder, run on a user
turn [target image, prompt] without a system prompt; hidden_states[-2], at most 1024 tokens, the
image resized to 512^2..768^2 pixels. The DiT takes these features in its caption slot, so they
must live in the text encoder's feature space: that is what the graft buys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

IMAGE_TOKEN = "<|image_pad|>"
# Tokens the two encoders' inputs use: they must have the same ids in both tokenizers.
SHARED_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|vision_start|>",
    "<|vision_end|>",
    IMAGE_TOKEN,
)
POSITION_SCHEMES = ("vlm", "text")

# Config fields that must agree between the text encoder and the VLM's language model: without
# them the copied weights cannot even run (widths, layer count, vocabulary, activation).
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
)
# Fields that may differ: the graft copies weights only, and the VLM keeps its own settings
# (the reference code does so; Qwen3-VL-4B has rope_theta 5e6 and interleaved multimodal RoPE
# where Qwen3-4B has 1e6). They are logged and recorded in the feature manifest.
_RECORDED_FIELDS = ("rms_norm_eps", "max_position_embeddings")

log = logging.getLogger(__name__)


class GraftError(ValueError):
    pass


def _rope_parameters(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and hasattr(config, "rope_theta"):
        params["rope_theta"] = config.rope_theta
    return params


def graft_differences(text_config, vlm_text_config) -> dict[str, list]:
    """Non-weight settings that differ between the two language models: {field: [text, vlm]}."""
    diffs = {}
    for name in _RECORDED_FIELDS:
        a, b = getattr(text_config, name, None), getattr(vlm_text_config, name, None)
        if a != b:
            diffs[name] = [a, b]
    a, b = _rope_parameters(text_config), _rope_parameters(vlm_text_config)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diffs[f"rope.{key}"] = [a.get(key), b.get(key)]
    return diffs


def check_graft_compatible(text_model: PreTrainedModel, vlm: Qwen3VLForConditionalGeneration) -> dict[str, list]:
    """Refuse what cannot work (widths, layers, vocabulary size); return what merely differs."""
    tc, vc = text_model.config, vlm.config.text_config
    for name in _REQUIRED_FIELDS:
        a, b = getattr(tc, name, None), getattr(vc, name, None)
        if a != b:
            raise GraftError(f"cannot graft: text encoder {name}={a} but VLM language model {name}={b}")
    return graft_differences(tc, vc)


def graft_language_model(vlm: Qwen3VLForConditionalGeneration, text_model: PreTrainedModel) -> dict[str, list]:
    """Copy the text encoder's weights into the VLM's language model, in place; returns the
    non-weight settings that differ (the VLM keeps its own)."""
    diffs = check_graft_compatible(text_model, vlm)
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
    if diffs:
        log.info(
            "graft: the VLM keeps its own %s", ", ".join(f"{k}={v[1]} (text encoder: {v[0]})" for k, v in diffs.items())
        )
    return diffs


def use_text_positions(vlm: Qwen3VLForConditionalGeneration, text_model: PreTrainedModel) -> None:
    """The other choice: the text encoder's rotary base in the VLM (text tokens then get exactly the
    text encoder's positions; image tokens keep their 3-D multimodal positions)."""
    theta = _rope_parameters(text_model.config).get("rope_theta")
    lm = vlm.model.language_model
    lm.config.rope_parameters = {**_rope_parameters(lm.config), "rope_theta": theta}
    rotary = type(lm.rotary_emb)(config=lm.config)
    lm.rotary_emb = rotary.to(next(lm.parameters()).device)


def check_tokenizers_agree(text: PreTrainedTokenizerBase, vlm: PreTrainedTokenizerBase) -> None:
    """The grafted embedding table is indexed by the text encoder's ids: every token both
    tokenizers know must have the same id, and the special tokens of the inputs must exist in both.
    (Tokens only one of them has are fine: the table has `vocab_size` rows either way.)"""
    a, b = text.get_vocab(), vlm.get_vocab()
    for token in SHARED_SPECIAL_TOKENS:
        if token not in a or token not in b:
            side = "text encoder" if token not in a else "VLM"
            raise GraftError(f"cannot graft: the {side} tokenizer has no {token}")
    clash = next((t for t in a.keys() & b.keys() if a[t] != b[t]), None)
    if clash is not None:
        raise GraftError(
            f"cannot graft: token {clash!r} has id {a[clash]} in the text encoder's tokenizer "
            f"but {b[clash]} in the VLM's"
        )


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
        positions: str = "vlm",
        graft: dict | None = None,
    ):
        if positions not in POSITION_SCHEMES:
            raise ValueError(f"positions={positions!r}: expected one of {', '.join(POSITION_SCHEMES)}")
        self.positions, self.graft = positions, graft
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
    ) -> VLMTeacherContext:
        """Load a Qwen3-VL directory and graft `text_encoder` into it (when given).

        `positions="vlm"` (default, the reference code) keeps the VLM's own rotary settings;
        `"text"` gives it the text encoder's rotary base (see :func:`use_text_positions`).
        """
        model = Qwen3VLForConditionalGeneration.from_pretrained(str(vlm_path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(vlm_path))
        graft = None
        if text_encoder is not None:
            graft = {"differences": graft_language_model(model, text_encoder)}
            if kw.get("positions", "vlm") == "text":
                use_text_positions(model, text_encoder)
        if text_tokenizer is not None:
            check_tokenizers_agree(text_tokenizer, tokenizer)
        # The PIL processor always: transformers picks a torchvision one when it can import it,
        # and the two give different pixels (features must not depend on the machine).
        processor = Qwen2VLImageProcessorPil.from_pretrained(str(vlm_path))
        return cls(model.to(device), tokenizer, processor, graft=graft, **kw)

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
            "image_processor": "pil",
            "positions": self.positions,
            "graft": self.graft,
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
