"""`vlm` (Z-Image-Turbo recipe): a Qwen3-VL with the text encoder's weights, shown [image, prompt].

The VLM's language model is replaced by the student's text encoder (the graft, see
`dopsd_scale.encoders.vlm`), so its hidden states live in the feature space the DiT reads in
its caption slot. It sees the target exactly as the student's latents do: the bucket crop.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..encoders.vlm import VLMTeacherContext
from .base import CachingEncoders, ContextItem, TeacherContext, require_option, variant_tensors


class VLMContext(TeacherContext):
    name = "vlm"

    @classmethod
    def check_options(cls, options: dict) -> None:
        require_option(options, "teacher_vlm", "--teacher-vlm", cls.name)

    def __init__(self, encoders: CachingEncoders, options: dict):
        super().__init__(encoders, options)
        path = options["teacher_vlm"]
        prompt = encoders.prompt
        self.vlm = VLMTeacherContext.from_pretrained(
            path,
            text_encoder=prompt.model,
            text_tokenizer=prompt.tokenizer,
            device=options.get("device", "cpu"),
            max_tokens=options.get("vlm_max_tokens", 1024),
            min_pixels=options.get("vlm_min_pixels", 512 * 512),
            max_pixels=options.get("vlm_max_pixels", 768 * 768),
            positions=options.get("vlm_positions", "vlm"),
        )
        self.path = path

    def describe(self) -> dict:
        from ..data.format import hash_model_dir

        return {
            "path": self.path.rstrip("/").split("/")[-1],
            **self.vlm.describe(),
            "hashes": hash_model_dir(self.path),
        }

    def missing(self, item: ContextItem) -> Optional[str]:
        return None

    def encode(self, items: list[ContextItem], student: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for item in items:
            feats = self.vlm.encode([item.image] * len(item.captions), item.captions)
            out.append(variant_tensors(feats))
        return out
