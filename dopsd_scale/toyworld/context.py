"""`silhouette_reference`: the toy world's teacher context, cached like any other.

The teacher reads the same caption as the student and gets a reference image: the target's
silhouette (its position and outline, without its colours: white on black, or randomly
recoloured, per the model's `reference_style`), so the shape comes from the reference and the
colours from the caption. It is derived from the target image alone (the background is
estimated from the border), seeded by the sample's key, and stored as `ref_latents`
[1, 3, 16, 16] in pixel space; the toy model spec packs it as input channels.
"""

from __future__ import annotations

import hashlib

import torch

from ..contexts.base import ContextItem, TeacherContext, variant_tensors
from . import world


def key_seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=4).digest(), "little")


class SilhouetteReferenceContext(TeacherContext):
    name = "silhouette_reference"
    uses_reference_latents = True

    def describe(self) -> dict:
        return {"reference_style": self.encoders.spec.reference_style, "mask_threshold": world.MASK_THRESHOLD}

    def encode(self, items: list[ContextItem], student: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for item, feats in zip(items, student):
            tensors = variant_tensors(list(feats))
            image = world.from_pil(item.image)
            style = self.encoders.spec.reference_style
            tensors["ref_latents"] = world.reference_from_image(image, key_seed(item.key), style).unsqueeze(0)
            out.append(tensors)
        return out
