"""Generating the evaluation images: batched, resumable, in this process or on Ray actors.

Every image is a PNG on disk at `<out>/images/<model>/<set>/seed_<s>/<index>_<prompt hash>.png`,
written atomically (temporary file, then rename); an image that exists is never generated again,
so an interrupted evaluation continues where it stopped. `<out>/images/<model>/model.json`
records what produced the folder (paths, checkpoint, steps, size, dtype) and a rerun with other
settings under the same name is refused rather than mixed.

Each model runs what its users run: the stock diffusers pipeline of the directory (guidance off)
at its few-step setting, loaded once per worker and model, or the spec's own sampler for specs
without one (the toy world). Image `i` of seed `s` always starts from the noise of generator
`noise_seed(s, i)`, whatever the batch, so base and tuned models share noise prompt by prompt.

Tasks are whole (model, prompt set, seed) triples, run here or spread over Ray actors (one GPU
each on CUDA; `dopsd_scale/task_pool.py`), preferring an actor that already holds the task's model;
nothing large travels through Ray (tasks are small dicts, results are counts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError
from ..task_pool import make_pool

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ModelRef:
    """A model to evaluate: a model directory, or a base directory plus a training checkpoint."""

    name: str
    path: str
    checkpoint: Optional[str] = None
    weights: str = "student"
    model_name: str = "auto"


def resolve_tuned(text: str, base: str, weights: str, model_name: str, flag: str = "--tuned") -> ModelRef:
    """`[NAME=]PATH` -> a ModelRef: PATH is an export (a model directory), a checkpoint, a run's
    `checkpoints/` folder, or a run directory (its export if it has one, else its latest checkpoint)."""
    from ..checkpoint import LATEST, is_checkpoint

    name, sep, path = text.partition("=")
    if not sep:
        name, path = "", text
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no such directory")
    if (p / "export").is_dir() and _is_model_dir(p / "export"):
        p = p / "export"
    elif (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if not name:
        name = p.parent.name if p.name in ("export", "checkpoints") else p.name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if _is_model_dir(p):
        return ModelRef(name, str(p), None, weights, model_name)
    if is_checkpoint(p) or (p / LATEST).is_file():
        return ModelRef(name, base, str(p), weights, model_name)
    raise FileNotFoundError(f"{flag} {path}: neither a model directory (an export) nor a training checkpoint")


def _is_model_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "toyworld.json").is_file()


def noise_seed(seed: int, index: int) -> int:
    """The generator seed of prompt `index` at evaluation seed `seed` (disjoint for < 1M prompts)."""
    return seed * 1_000_003 + index


def image_path(root: str | Path, model: str, prompt_set: str, seed: int, index: int, prompt: str) -> Path:
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:10]
    return Path(root) / "images" / model / prompt_set / f"seed_{seed}" / f"{index:05d}_{digest}.png"


def save_png(image: Image.Image, path: Path) -> None:
    """Atomic: a kill mid-write leaves a temporary file, never a truncated PNG under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def consecutive_runs(indices: list[int], limit: int) -> list[list[int]]:
    """Sorted indices cut into runs of consecutive values, at most `limit` long (one batch each)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < limit:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


# ---- the worker -------------------------------------------------------------------------------------
class GenerationWorker:
    """Holds one model at a time and renders whole (model, set, seed) tasks into the image cache.

    `opts`: out, device, dtype, steps, height, width, batch_size (all JSON values, for Ray).
    """

    def __init__(self, opts: dict):
        self.opts = opts
        self.loaded: Optional[str] = None
        self.render: Optional[Callable[[list[str], list[int]], list]] = None

    def run(self, task: dict) -> dict:
        ref, prompts, seed = ModelRef(**task["model"]), task["prompts"], task["seed"]
        paths = [image_path(self.opts["out"], ref.name, task["set"], seed, i, p) for i, p in enumerate(prompts)]
        todo = [i for i, path in enumerate(paths) if not path.is_file()]
        if todo:
            self._load(ref)
        for run in consecutive_runs(todo, int(self.opts["batch_size"])):
            images = self.render([prompts[i] for i in run], [noise_seed(seed, i) for i in run])
            for i, image in zip(run, images):
                save_png(image, paths[i])
        return {"name": task["name"], "generated": len(todo), "cached": len(prompts) - len(todo)}

    def _load(self, ref: ModelRef) -> None:
        key = json.dumps(asdict(ref), sort_keys=True)
        if self.loaded == key:
            return
        self.render, self.loaded = None, None
        if self.opts["device"].startswith("cuda"):
            torch.cuda.empty_cache()
        self.render = load_renderer(ref, self.opts)
        self.loaded = key


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def load_renderer(ref: ModelRef, opts: dict) -> Callable[[list[str], list[int]], list]:
    """(prompts, generator seeds) -> PIL images, with the model's own sampler at its few-step setting."""
    from ..checkpoint import load_student_weights
    from ..models import detect_spec_name, get_spec
    from ..models.spec import ModelSpec

    spec = get_spec(detect_spec_name(ref.path) if ref.model_name == "auto" else ref.model_name, ref.path)
    dtype = torch_dtype(opts["dtype"], opts["device"])
    transformer = None
    if ref.checkpoint:
        transformer = spec.load_transformer(torch.float32)
        load_student_weights(transformer, ref.checkpoint, which=ref.weights)
        if dtype != torch.float32:
            transformer = transformer.to(dtype)
    steps = opts.get("steps") or spec.sample_steps
    height, width = opts.get("height") or spec.default_size, opts.get("width") or spec.default_size
    if type(spec).generate is not ModelSpec.generate:  # a spec with its own sampler (the toy world)

        def render_own(prompts: list[str], seeds: list[int]) -> list:
            # the spec seeds prompt i with seed + i: runs of consecutive indices keep that exact
            return spec.generate(
                prompts, steps=steps, height=height, width=width, seed=seeds[0], transformer=transformer
            )

        return render_own
    # kept loaded: a real pipeline takes longer to load than a batch takes to render
    pipe = spec.pipeline(transformer, dtype).to(opts["device"])

    def render(prompts: list[str], seeds: list[int]) -> list:
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        return pipe(
            prompt=list(prompts),
            height=height,
            width=width,
            num_inference_steps=steps,
            generator=generators,
            **spec.pipeline_kwargs,
        ).images

    return render


def _model_name(task: dict) -> str:
    return task["model"]["name"]


# ---- the whole generation ----------------------------------------------------------------------------
def make_tasks(models: list[ModelRef], prompt_sets: dict[str, list[str]], seeds: list[int]) -> list[dict]:
    return [
        {"name": f"{m.name}/{name}/seed_{s}", "model": asdict(m), "set": name, "prompts": prompts, "seed": s}
        for m in models
        for name, prompts in prompt_sets.items()
        for s in seeds
    ]


def check_model_record(out: str | Path, ref: ModelRef, opts: dict) -> None:
    """Write `images/<name>/model.json`, or refuse when the folder holds another model's images."""
    record = {
        **asdict(ref),
        "path": str(Path(ref.path).resolve()),
        "checkpoint": str(Path(ref.checkpoint).resolve()) if ref.checkpoint else None,
        **{k: opts.get(k) for k in ("steps", "height", "width", "dtype")},
    }
    path = Path(out) / "images" / ref.name / "model.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != record:
            diff = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in record.items() if old.get(k) != v)
            raise ConfigError(
                f"--out {out}: the images of model {ref.name!r} came from other settings ({diff}); "
                "use another --out or another name"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2), encoding="utf-8")


def generate_all(
    models: list[ModelRef],
    prompt_sets: dict[str, list[str]],
    seeds: list[int],
    opts: dict,
    workers: int = 0,
    address: Optional[str] = None,
    retries: int = 1,
) -> dict:
    """Render every missing image; returns {generated, cached}. Raises when a task still fails
    after its retries (what was rendered stays: a rerun continues from there)."""
    for ref in models:
        check_model_record(opts["out"], ref, opts)
    totals = {"generated": 0, "cached": 0}

    def on_result(result: dict) -> None:
        totals["generated"] += result["generated"]
        totals["cached"] += result["cached"]
        log.info("%s: %d generated, %d cached", result["name"], result["generated"], result["cached"])

    pool = make_pool(GenerationWorker, opts, workers, address, retries, "generation", affinity=_model_name)
    try:
        failed = pool.run(make_tasks(models, prompt_sets, seeds), on_result)
    finally:
        pool.close()
    if failed:
        raise RuntimeError(
            f"generation failed for {len(failed)} task(s), first {failed[0]['name']}: "
            f"{failed[0]['error']}; rerun to continue from the images already written"
        )
    return totals


# ---- reading images back ------------------------------------------------------------------------------
def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> [3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def load_generated(out: str | Path, model: str, prompt_set: str, seed: int, prompts: list[str]) -> list[torch.Tensor]:
    return [read_image(image_path(out, model, prompt_set, seed, i, p)) for i, p in enumerate(prompts)]


def read_image(path: str | Path) -> torch.Tensor:
    with Image.open(path) as im:
        return to_tensor(im)


def list_images(folder: str | Path, flag: str) -> list[Path]:
    """Every image file of a folder (recursively, sorted by path); errors name the CLI flag."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: no such directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"{flag} {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths
