"""Text-only teacher contexts: the prompt itself, or a richer caption of the same image.

`prompt`: the teacher's condition is the student's own prompt features. The teacher still
differs from the student (it is the EMA), so this is on-policy self-distillation on prompts
alone: what anchor prompts use to keep what the model knew.

`enhanced_prompt`: the teacher reads a longer or richer caption the sample already carries
(`--teacher-caption-field detailed`, a caption column of the image shard), encoded by the
student's own prompt encoder; for users with rich captions and no multimodal encoder. Every
caption variant the student sees gets the same enhanced teacher caption.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import CachingEncoders, ContextItem, TeacherContext, require_option, variant_tensors


class PromptContext(TeacherContext):
    name = "prompt"

    def encode(self, items: list[ContextItem], student: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return [variant_tensors(feats) for feats in student]


class EnhancedPromptContext(TeacherContext):
    name = "enhanced_prompt"

    @classmethod
    def check_options(cls, options: dict) -> None:
        require_option(options, "teacher_caption_field", "--teacher-caption-field", cls.name)

    def __init__(self, encoders: CachingEncoders, options: dict):
        super().__init__(encoders, options)
        self.field = options["teacher_caption_field"]

    def describe(self) -> dict:
        return {"caption_field": self.field}

    def teacher_only_fields(self) -> set[str]:
        return {self.field}

    def missing(self, item: ContextItem) -> Optional[str]:
        text = item.fields.get(self.field, "")
        return None if text.strip() else f"no '{self.field}' caption (needed by the enhanced_prompt context)"

    def encode(self, items: list[ContextItem], student: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        enhanced = self.encoders.encode_prompts([item.fields[self.field] for item in items])
        return [variant_tensors([feats] * len(item.captions)) for item, feats in zip(items, enhanced)]
