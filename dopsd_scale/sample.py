"""Few-step generation with the model's own sampler, and checkpoint export.

`sample_images` runs what a user of the model runs: for a diffusers pipeline directory the very
pipeline class it names (ZImagePipeline, Flux2KleinPipeline) with no guidance, for a toy model its
spec's Euler sampler; optionally after loading a training checkpoint's student (or teacher)
weights into the transformer. Every prompt gets its own generator (`seed + i`), so an image does
not depend on which other prompts share its batch.

LoRA (`model.finetune=lora` runs): `checkpoint` may be a LoRA run's, whose adapter is attached to
the base transformer as training ran it; `lora` is an exported adapter directory (the diffusers
LoRA file), loaded by the family's stock pipeline loader (`load_lora_weights`' own two steps). A
merged export is a whole pipeline directory: pass it as `model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checkpoint import load_student_weights, resolve_checkpoint, run_config
from .consolidate import read_entry
from .lora_files import LoraFileSettings, adapter_to_peft, export_lora, resolve_lora_dir
from .models import detect_spec_name, get_spec
from .validation import images_to_grid


def resolve_spec(model: str, model_name: str = "auto"):
    return get_spec(detect_spec_name(model) if model_name == "auto" else model_name, model)


def sample_images(
    model: str,
    prompts: list[str],
    out_dir: str,
    checkpoint: Optional[str] = None,
    steps: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    seed: int = 0,
    model_name: str = "auto",
    weights: str = "student",
    lora: Optional[str] = None,
) -> list[Path]:
    """Write `sample_<i>.png` per prompt and `grid.png`; returns their paths."""
    spec = resolve_spec(model, model_name)
    transformer = None
    if checkpoint:
        transformer = checkpoint_transformer(spec, checkpoint, weights)
    if lora:
        transformer = transformer if transformer is not None else spec.load_transformer(torch.float32)
        load_exported_lora(spec, transformer, lora)
    images = spec.generate(prompts, steps=steps, height=height, width=width, seed=seed, transformer=transformer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out / f"sample_{i:03d}.png"
        image.save(path)
        paths.append(path)
    tensors = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) / 255.0 for im in images])
    grid_path = out / "grid.png"
    images_to_grid(tensors).save(grid_path)
    return paths + [grid_path]


def checkpoint_transformer(spec, checkpoint: str, which: str = "student"):
    """The base transformer with a checkpoint's student (or teacher) weights; a LoRA run's adapter
    is attached (not merged), with the run's rank and alpha."""
    path = resolve_checkpoint(checkpoint)
    settings = LoraFileSettings.from_run_config(run_config(path))
    transformer = spec.load_transformer(torch.float32)
    if settings is None:
        load_student_weights(transformer, path, which=which)
        return transformer
    from .lora import attach_adapter

    if which == "teacher" and settings.teacher_kind != "ema":
        raise FileNotFoundError(
            f"{path}: a LoRA run with teacher.kind={settings.teacher_kind} keeps no teacher adapter"
        )
    attach_adapter(transformer, lora_state(path, which), settings.rank, settings.alpha)
    return transformer.eval()


def lora_state(path: Path, which: str = "student"):
    """One adapter of a LoRA checkpoint, under peft's adapter-free names."""
    return adapter_to_peft(read_entry(path, which, adapters_only=True), which)


def load_exported_lora(spec, transformer, lora_dir: str) -> None:
    """What the stock pipeline's `load_lora_weights` does, on the transformer alone."""
    import diffusers

    loader = getattr(diffusers, spec.lora_pipeline)
    state, metadata = loader.lora_state_dict(str(resolve_lora_dir(lora_dir)), return_lora_metadata=True)
    loader.load_lora_into_transformer(state, transformer=transformer, metadata=metadata)


def export_checkpoint(
    model: str, checkpoint: str, out_dir: str, which: str = "student", model_name: str = "auto", merged: bool = False
) -> Path:
    """Load a (sharded) checkpoint's weights into the base model on CPU and save diffusers-format.
    A LoRA run's checkpoint: the adapter as a diffusers LoRA file (`<out>/lora`) and, with
    `merged`, a whole model with it merged (`<out>/merged`); returns the LoRA directory."""
    spec = resolve_spec(model, model_name)
    path = resolve_checkpoint(checkpoint)
    settings = LoraFileSettings.from_run_config(run_config(path))
    if settings is not None:
        return export_lora(spec, lora_state(path, which), settings.scale, out_dir, merged=merged)
    transformer = spec.load_transformer(torch.float32)
    load_student_weights(transformer, checkpoint, which=which)
    return spec.export(transformer, out_dir)
