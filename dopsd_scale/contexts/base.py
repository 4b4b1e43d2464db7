"""The teacher-context interface: what the teacher sees beyond the student's prompt.

A teacher context is where D-OPSD users experiment (a multimodal encoder shown the target image,
the model's own editing branch, a richer caption, several reference images), so each one is a
small class behind this interface, computed OFFLINE by `cache-features`:

  caching time  `encode(items, student)` turns what the image shard holds for a sample (the
                target cropped to its bucket, the caption variants, named caption columns,
                extra reference images) into the tensors stored in the feature sample:
                `teacher` / `teacher_<i>` [L, D] per caption variant (the teacher's condition
                in the DiT's caption slot) and optionally `ref_latents` [R, C, h, w] (reference
                images in latent space, for families that append them to the image tokens).
                `missing(item)` names what a sample lacks (reported per sample, never a crash);
                `describe()` is recorded in the feature manifest.
  training time  nothing runs: the reader delivers the stored tensors, the model spec packs
                `ref_latents` (`ModelSpec.accepts_reference_latents`), and the trainer refuses
                at start-up a run whose `teacher.context` is not the one the shards hold.

`CachingEncoders` is what a caching worker holds, built from the model spec: the student's
prompt encoder (the family's own text features), the latent encoder (its VAE convention), and
the options of the context. A context adds its own models (e.g. the VLM) in its constructor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from PIL import Image


@dataclass
class ContextItem:
    """One input sample as a context sees it at caching time."""

    key: str
    image: Optional[Image.Image]
    """The target image cropped to its bucket: the very pixels of the student's target latents
    (None for prompt-only samples: anchor prompts)."""
    captions: list[str]
    """The caption variants the student is trained on (variant i -> `student_<i>`)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Every caption column of the sample by name (e.g. `text`, `detailed`)."""
    references: list[Image.Image] = field(default_factory=list)
    """Extra reference images of the sample (other photos of the subject), cropped to the bucket."""
    bucket: tuple[int, int] = (0, 0)


@dataclass
class CachingEncoders:
    """The models a caching worker holds for one model family (see the module docstring)."""

    spec: Any
    prompt: Any
    """Student prompt encoder: `encode(list[str]) -> list[Tensor [L, D]]`, `describe()`, `dim`."""
    options: dict
    """Caching options (device, batch size, context options such as `teacher_vlm`)."""
    _latent: Any = None

    @property
    def latent(self):
        """The family's latent encoder (`encode(list[PIL]) -> [B, C, h, w]`), built on first use."""
        if self._latent is None:
            self._latent = self.spec.latent_encoder(self.options.get("device", "cpu"))
        return self._latent

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompt features in batches of `batch_size` (the encoder pads each batch to its longest)."""
        size = int(self.options.get("batch_size", 8))
        out: list[torch.Tensor] = []
        for start in range(0, len(prompts), size):
            out.extend(self.prompt.encode(prompts[start : start + size]))
        return out


class ContextError(ValueError):
    """A context that cannot be built with the given options; the message names the option."""


class TeacherContext:
    """Base class; subclasses set `name` and implement `encode` (and `missing`/`describe`)."""

    name: ClassVar[str] = ""
    uses_reference_latents: ClassVar[bool] = False
    """Whether samples carry `ref_latents` (the model spec must be able to pack them)."""

    def __init__(self, encoders: CachingEncoders, options: dict):
        self.check_options(options)
        self.encoders, self.options = encoders, options

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Refuse missing or wrong options before any model loads (raises ContextError)."""

    def describe(self) -> dict:
        """What the manifest records besides `kind` (settings that change the features)."""
        return {}

    def missing(self, item: ContextItem) -> Optional[str]:
        """Why this sample cannot get this context (None when it can)."""
        return None

    def teacher_only_fields(self) -> set[str]:
        """Caption columns the teacher reads and the student must not be trained on."""
        return set()

    def encode(self, items: list[ContextItem], student: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Per item the teacher tensors (`teacher`/`teacher_<i>` per variant, optional `ref_latents`).

        `student[j][i]` are item j's student features of caption variant i, already computed.
        """
        raise NotImplementedError


def variant_tensors(per_variant: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """`teacher`, `teacher_1`, ... from a list of per-variant features."""
    return {("teacher" if i == 0 else f"teacher_{i}"): t for i, t in enumerate(per_variant)}


def require_option(options: dict, key: str, flag: str, context: str) -> Any:
    value = options.get(key)
    if value in (None, ""):
        raise ContextError(f"teacher context {context!r} needs {flag}")
    if key.endswith("_path") or key == "teacher_vlm":
        if not Path(value).is_dir():
            raise ContextError(f"{flag} {value}: directory not found")
    return value
