"""`edit_reference` (FLUX.2-klein recipe): the model's own editing branch, shown the target.

The teacher reads the prompt followed, in the same user turn, by a fixed editing instruction
(`f"{prompt} {instruction}"`; the reference code's instruction is the default, verbatim, and it
is recorded in the manifest since it is baked into the features), and gets the target image's
latents (the same bucket crop as the student's target) as reference latents, which the model
spec appends to the image tokens with their own position ids. With `--extra-references`, the
sample's other reference images (e.g. other photos of the same subject) follow the target.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import CachingEncoders, ContextItem, TeacherContext, variant_tensors

REFERENCE_INSTRUCTION = (
    "Make the main subject (facial/ip details), background, and overall composition consistent with the "
    "reference image."
)


class EditReferenceContext(TeacherContext):
    name = "edit_reference"
    uses_reference_latents = True

    def __init__(self, encoders: CachingEncoders, options: dict):
        super().__init__(encoders, options)
        instruction = options.get("instruction")
        self.instruction = REFERENCE_INSTRUCTION if instruction is None else instruction
        self.extra_references = bool(options.get("extra_references", False))

    def describe(self) -> dict:
        return {
            "instruction": self.instruction,
            "extra_references": self.extra_references,
            "latents": self.encoders.latent.describe(),
        }

    def teacher_prompt(self, caption: str) -> str:
        return f"{caption} {self.instruction}" if self.instruction else caption

    def missing(self, item: ContextItem) -> Optional[str]:
        if self.extra_references and not item.references:
            return "no extra reference image (needed by edit_reference with --extra-references)"
        return None

    def encode(self, items: list[ContextItem], student: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        prompts = [self.teacher_prompt(c) for item in items for c in item.captions]
        feats = iter(self.encoders.encode_prompts(prompts))
        out = []
        for item in items:
            images = [item.image] + (item.references if self.extra_references else [])
            tensors = variant_tensors([next(feats) for _ in item.captions])
            tensors["ref_latents"] = self.encoders.latent.encode(images).float()
            out.append(tensors)
        return out
