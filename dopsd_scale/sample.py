"""Few-step generation through the stock diffusers pipeline, and checkpoint export.

`sample_images` runs the very pipeline class a user runs (ZImagePipeline for Z-Image) with no
guidance, optionally after loading a training checkpoint's student weights into its transformer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checkpoint import load_student_weights
from .models import get_spec
from .validation import images_to_grid


def _pipeline_class(model_dir: Path):
    import diffusers

    from .models.spec import read_json

    index = model_dir / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{model_dir}: sampling needs a whole pipeline directory (model_index.json)")
    return getattr(diffusers, read_json(index)["_class_name"])


def sample_images(model: str, prompts: list[str], out_dir: str, checkpoint: Optional[str] = None,
                  steps: int = 8, height: int = 1024, width: int = 1024, seed: int = 0,
                  model_name: str = "zimage") -> list[Path]:
    model_dir = Path(model)
    pipe = _pipeline_class(model_dir).from_pretrained(str(model_dir))
    if checkpoint:
        load_student_weights(pipe.transformer, checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = pipe(prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
                  generator=generator).images
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


def export_checkpoint(model: str, checkpoint: str, out_dir: str, which: str = "student",
                      model_name: str = "zimage") -> Path:
    """Load a (sharded) checkpoint's weights into the base model on CPU and save diffusers-format."""
    spec = get_spec(model_name, model)
    transformer = spec.load_transformer(torch.float32)
    load_student_weights(transformer, checkpoint, which=which)
    return spec.export(transformer, out_dir)
