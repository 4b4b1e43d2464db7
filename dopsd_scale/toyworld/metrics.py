"""Metrics on generated toy-world images (batches [B, 3, 16, 16] in [-1, 1]).

- `attribute_accuracy`: does the evaluator read the caption's shape, colour and background off the image?
- `frechet_distance`: Frechet distance between Gaussians fitted to two sets of evaluator features.
- `sharpness` and `palette_distance`: always report them TOGETHER. Noise raises sharpness as much
  as crisp edges do, but noise also moves pixels off the world's palette; a blurry image has low
  sharpness and (on its edges) a moderate palette distance. Real renders give the reference values
  (`reference_stats`): only antialiased edge pixels are off-palette there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from dopsd_scale.toyworld import world
from dopsd_scale.toyworld.classifier import SHAPE_CLASSES, classify, shape_class

PALETTE = torch.from_numpy(
    np.stack([world.rgb01(c) for c in (*world.COLOURS.values(), *world.BACKGROUNDS.values())])
).float()
"""The 8 foreground and 3 background colours, [11, 3] in [0, 1]."""


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] pixel units, float32 on the CPU."""
    return (images.detach().cpu().float() + 1) / 2


# ----------------------------------------------------------------------------- evaluator-based


def expected_shape_class(item: world.Item) -> str:
    """The shape class the evaluator should see: old shapes by name, `star` for zorp, `other` otherwise."""
    return shape_class(item.shape)


def attribute_accuracy(model: nn.Module, images: torch.Tensor, items: Sequence[world.Item]) -> dict[str, float]:
    """Fractions of images whose predicted shape / colour / background (and `all` three) match the items."""
    if len(items) != len(images):
        raise ValueError(f"{len(images)} images but {len(items)} items")
    pred = classify(model, images)
    hits = {
        "shape": [p == expected_shape_class(i) for p, i in zip(pred["shape"], items)],
        "colour": [p == i.colour for p, i in zip(pred["colour"], items)],
        "background": [p == i.background for p, i in zip(pred["background"], items)],
    }
    out = {name: float(np.mean(h)) for name, h in hits.items()}
    out["all"] = float(np.mean([s and c and b for s, c, b in zip(*hits.values())]))
    return out


def shape_histogram(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Fraction of images predicted as each shape class (e.g. how often a zorp comes out as a square)."""
    names = classify(model, images)["shape"]
    return {cls: names.count(cls) / max(1, len(names)) for cls in SHAPE_CLASSES}


@contextmanager
def one_thread():
    """Small eigendecompositions on one thread: on shared cores, two OpenMP threads waiting on each
    other made a 128x128 Frechet distance take seconds instead of milliseconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sqrtm_trace_product(cov_a: torch.Tensor, cov_b: torch.Tensor) -> float:
    """tr(sqrt(A B)) for symmetric PSD A, B: scipy's sqrtm when importable, else two eigendecompositions."""
    try:
        from scipy import linalg
    except ImportError:
        linalg = None
    if linalg is not None:
        root = linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())
        return float(np.real(np.trace(root)))
    # sqrt(A B) is similar to sqrt(A^1/2 B A^1/2), which is symmetric PSD: same trace
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    inner = root_a @ cov_b @ root_a
    return float(torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum())


def gaussian_fit(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) in float64; the covariance is unbiased (N - 1)."""
    x = feats.detach().cpu().double()
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need [N >= 2, D] features, got {tuple(x.shape)}")
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (len(x) - 1)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrt(S_a S_b)) between Gaussians fitted to [N, D] feature sets."""
    with one_thread():
        mu_a, cov_a = gaussian_fit(feats_a)
        mu_b, cov_b = gaussian_fit(feats_b)
        mean_term = float(((mu_a - mu_b) ** 2).sum())
        trace_term = float(torch.trace(cov_a) + torch.trace(cov_b)) - 2 * _sqrtm_trace_product(cov_a, cov_b)
    return mean_term + max(trace_term, 0.0)  # rounding can leave a tiny negative trace term


# ----------------------------------------------------------------------------- pixel statistics


def sharpness(images: torch.Tensor) -> float:
    """Mean gradient magnitude (forward differences, [0, 1] units) per image, averaged over the batch."""
    x = to_unit(images)
    gx = x[..., :-1, 1:] - x[..., :-1, :-1]
    gy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return float(torch.sqrt(gx * gx + gy * gy).mean())


def palette_distance(images: torch.Tensor) -> float:
    """Mean over pixels of the RGB distance ([0, 1] units) to the nearest of the 11 palette colours."""
    pixels = to_unit(images).movedim(-3, -1).reshape(-1, 3)
    return float(torch.cdist(pixels, PALETTE).min(dim=1).values.mean())


# ----------------------------------------------------------------------------- summaries


def image_metrics(
    model: nn.Module,
    images: torch.Tensor,
    items: Sequence[world.Item],
    reference_features: Optional[torch.Tensor] = None,
) -> dict[str, Any]:
    """Every metric of one batch: accuracies, sharpness, palette distance, and the Frechet distance
    to `reference_features` (evaluator features of real renders) when given."""
    out: dict[str, Any] = {f"acc_{k}": v for k, v in attribute_accuracy(model, images, items).items()}
    out["sharpness"] = sharpness(images)
    out["palette_distance"] = palette_distance(images)
    if reference_features is not None:
        out["frechet"] = frechet_distance(classify(model, images)["features"], reference_features)
    return out


def real_features(model: nn.Module, items: Sequence[world.Item], seed: int) -> torch.Tensor:
    """Evaluator features [N, 128] of real renders of `items`."""
    images, _ = world.render_batch(items, seed)
    return classify(model, images)["features"]


def reference_stats(
    items: Sequence[world.Item],
    seed: int,
    model: Optional[nn.Module] = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """The same metrics on real renders of `items` (each repeated `repeats` times), for a table's
    "real data" row. With a model, `frechet` is the distance between two independent real sets of
    the same size: the floor a perfect generator would reach at that sample size."""
    batch = list(items) * repeats
    images, _ = world.render_batch(batch, seed)
    if model is None:
        return {"sharpness": sharpness(images), "palette_distance": palette_distance(images), "count": len(batch)}
    other = real_features(model, batch, seed + 1)
    stats = image_metrics(model, images, batch, reference_features=other)
    stats["count"] = len(batch)
    return stats


def format_row(name: str, stats: dict[str, Any], keys: Sequence[str]) -> str:
    """One markdown table row: the name, then `keys` as 3-decimal numbers (blank when missing)."""
    cells = [f"{stats[k]:.3f}" if isinstance(stats.get(k), float) and math.isfinite(stats[k]) else "" for k in keys]
    return "| " + " | ".join([name, *cells]) + " |"
