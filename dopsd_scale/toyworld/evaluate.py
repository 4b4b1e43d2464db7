"""Generating and scoring toy-world images: the numbers every method is judged by.

`ToyModel` is a toy model directory loaded for sampling: its spec, its DiT and its own text
encoder (captions are encoded once and cached). `generate` runs the few-step Euler sampler of the
spec (its inference schedule, from fixed per-image noise), prompt-only or with a reference image.
`evaluate` computes, the same way for every model:
  - concept: shape accuracy of the new word on held-out colour/background prompts (prompt only),
  - old: attribute accuracy on the base's own prompts (every old shape, colour, background),
  - quality on the old prompts: Frechet distance of the classifier's features to real renders of
    the same prompts, sharpness reported together with the palette distance (sharpness alone
    rewards noise), each beside the real renders' own values,
  - optionally the in-context (teacher) accuracy: the new shape drawn from its reference image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..models.spec import Condition
from . import world

EVAL_SEEDS_PER_PROMPT = {"concept": 8, "old": 2}


@dataclass
class ToyModel:
    spec: object
    model: nn.Module
    encoder: object  # PromptEncoder of the model directory
    _cache: dict

    @classmethod
    def load(cls, path: str | Path, model: Optional[nn.Module] = None) -> ToyModel:
        from ..encoders.text import PromptEncoder
        from ..models import get_spec

        spec = get_spec("toyworld", path)
        model = model if model is not None else spec.load_transformer().eval()
        encoder = PromptEncoder.from_pipeline(path)
        return cls(spec, model, encoder, {})

    def features(self, captions: Sequence[str]) -> Condition:
        """Padded caption features (every toy caption has the same length, so no padding in practice)."""
        todo = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if todo:
            self._cache.update(zip(todo, self.encoder.encode(todo)))
        feats = [self._cache[c] for c in captions]
        longest = max(f.shape[0] for f in feats)
        padded = torch.zeros(len(feats), longest, feats[0].shape[1])
        mask = torch.zeros(len(feats), longest, dtype=torch.bool)
        for i, f in enumerate(feats):
            padded[i, : f.shape[0]], mask[i, : f.shape[0]] = f, True
        return Condition(padded, mask)


def noise_for(n: int, seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(
    toy: ToyModel,
    captions: Sequence[str],
    seed: int,
    steps: Optional[int] = None,
    references: Optional[torch.Tensor] = None,
    batch: int = 256,
) -> torch.Tensor:
    """Images [N, 3, 16, 16] in [-1, 1]; `references` [N, 3, 16, 16] gives the in-context branch."""
    from ..flow import euler_rollout, schedule

    spec = toy.spec
    steps = steps or int(spec.world["sample_steps"])
    shape = spec.latent_shape(spec.default_size, spec.default_size)
    sigmas = schedule(spec.inference_sigmas(steps, shape))
    noise = noise_for(len(captions), seed, shape)
    out = []
    for start in range(0, len(captions), batch):
        part = slice(start, start + batch)
        cond = toy.features(captions[part])
        if references is not None:
            cond.ref_latents = references[part].unsqueeze(1)
        out.append(euler_rollout(lambda x, s, c=cond: spec.velocity(toy.model, x, s, c), noise[part], sigmas))
    return torch.cat(out).clamp(-1, 1)


def repeat_items(items: Sequence[world.Item], times: int) -> list[world.Item]:
    return [item for item in items for _ in range(times)]


def real_renders(items: Sequence[world.Item], seed: int) -> torch.Tensor:
    return world.render_batch(items, seed)[0]


def _quality(classifier: nn.Module, images: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    from .classifier import classify
    from .metrics import frechet_distance, palette_distance, sharpness

    fake_feats, real_feats = classify(classifier, images)["features"], classify(classifier, real)["features"]
    return {
        "frechet": frechet_distance(fake_feats, real_feats),
        "sharpness": sharpness(images),
        "palette": palette_distance(images),
    }


@torch.no_grad()
def evaluate(
    toy: ToyModel, classifier: nn.Module, seed: int = 0, steps: Optional[int] = None, in_context: bool = False
) -> dict[str, float]:
    """The metrics of one model at one generation seed (see the module docstring)."""
    from .metrics import attribute_accuracy

    toy.model.eval()
    concept = repeat_items(world.heldout_concept_items(), EVAL_SEEDS_PER_PROMPT["concept"])
    old = repeat_items(world.old_items(), EVAL_SEEDS_PER_PROMPT["old"])
    concept_images = generate(toy, [i.caption for i in concept], seed=seed * 7919 + 1, steps=steps)
    old_images = generate(toy, [i.caption for i in old], seed=seed * 7919 + 2, steps=steps)
    c_acc = attribute_accuracy(classifier, concept_images, concept)
    o_acc = attribute_accuracy(classifier, old_images, old)
    out = {
        "concept_shape": c_acc["shape"],
        "concept_all": c_acc["all"],
        "old_shape": o_acc["shape"],
        "old_all": o_acc["all"],
    }
    out.update({f"old_{k}": v for k, v in _quality(classifier, old_images, real_renders(old, seed + 10_000)).items()})
    if in_context:
        images, masks = world.render_batch(concept, seed + 20_000)
        refs = world.references_from_masks(masks, seed + 30_000, toy.spec.reference_style)
        teacher = generate(toy, [i.caption for i in concept], seed=seed * 7919 + 3, steps=steps, references=refs)
        out["teacher_concept_shape"] = attribute_accuracy(classifier, teacher, concept)["shape"]
    return out


def real_data_reference(classifier: nn.Module, seed: int = 0) -> dict[str, float]:
    """The quality metrics of real renders against other real renders: the floor of each value."""
    old = repeat_items(world.old_items(), EVAL_SEEDS_PER_PROMPT["old"])
    return {
        f"old_{k}": v
        for k, v in _quality(classifier, real_renders(old, seed + 40_000), real_renders(old, seed + 10_000)).items()
    }


def mean_and_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval over seeds (0 for a single value)."""
    from ..stats import t_interval

    return t_interval(values)


def measure_model(path: str | Path, seeds: Sequence[int] = (0, 1, 2), steps: Sequence[int] = (4, 8)) -> dict:
    """The numbers recorded beside a shipped base: every metric at each step count (mean and 95%
    interval over generation seeds), the in-context teacher's concept accuracy, and real renders."""
    from .classifier import load_classifier

    toy, classifier = ToyModel.load(path), load_classifier()
    out: dict = {"seeds": list(seeds), "real_renders": real_data_reference(classifier)}
    for n in steps:
        records = [evaluate(toy, classifier, seed=s, steps=n, in_context=True) for s in seeds]
        out[f"steps_{n}"] = {k: list(mean_and_interval([r[k] for r in records])) for k in records[0]}
    return out
