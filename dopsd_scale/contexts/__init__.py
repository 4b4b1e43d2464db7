"""Teacher contexts by name (see `base.py` for the interface).

Built in:
  vlm              Z-Image recipe: a Qwen3-VL grafted with the text encoder, shown [image, prompt]
  edit_reference   FLUX.2-klein recipe: prompt + editing instruction, the target as reference latents
  enhanced_prompt  a richer caption column of the same sample (no image encoder needed)
  prompt           the prompt alone (anchor prompts: text-only self-distillation)
  silhouette_reference  the toy world's in-context branch (its reference image as channels)
A context of your own needs no change here: pass `package.module:ClassName` as its name.
"""

from __future__ import annotations

import importlib

from .base import CachingEncoders, ContextError, ContextItem, TeacherContext

_BUILTIN = {
    "vlm": "dopsd_scale.contexts.vlm:VLMContext",
    "edit_reference": "dopsd_scale.contexts.edit_reference:EditReferenceContext",
    "enhanced_prompt": "dopsd_scale.contexts.prompts:EnhancedPromptContext",
    "prompt": "dopsd_scale.contexts.prompts:PromptContext",
    "silhouette_reference": "dopsd_scale.toyworld.context:SilhouetteReferenceContext",
}


def context_names() -> list[str]:
    return list(_BUILTIN)


def context_class(name: str) -> type[TeacherContext]:
    """The class of a built-in context, or of `module:Class`; raises ContextError naming it."""
    target = _BUILTIN.get(name, name)
    if ":" not in target:
        raise ContextError(f"unknown teacher context {name!r}; known: {', '.join(_BUILTIN)} (or module:Class)")
    module, _, cls = target.partition(":")
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise ContextError(f"teacher context {name!r}: cannot import {target} ({err})") from None
    if not (isinstance(found, type) and issubclass(found, TeacherContext)):
        raise ContextError(f"teacher context {name!r}: {target} is not a TeacherContext")
    return found


def uses_reference_latents(name: str) -> bool:
    return context_class(name).uses_reference_latents


__all__ = [
    "CachingEncoders",
    "ContextError",
    "ContextItem",
    "TeacherContext",
    "context_class",
    "context_names",
    "uses_reference_latents",
]
