"""The toy world's evaluator: a small CNN that reads shape, colour and background off a 16x16 image.

Trained once on freshly rendered batches (never the same image twice) and shipped as
`assets/classifier.safetensors` (fp32 weights) + `assets/classifier.json` (architecture, classes,
training record, held-out accuracies). The shape head has a reject class, `other`, for amorphous
blobs and spiky polygons, so an unrecognisable generation is not forced onto a known shape.

The network sees the image plus a colour-blind silhouette channel (see `silhouette`). Augmentation
(Gaussian pixel noise, an occasional slight blur, a small colour shift) makes it robust to the
imperfections of generated images. Noise sigmas are in [0, 1] pixel units.

Retrain (1,400 steps of 64, about 200 s on one shared core; the record lands in the JSON):
    python -m dopsd_scale.toyworld.classifier --out dopsd_scale/toyworld/assets/classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dopsd_scale.toyworld import world

SHAPE_CLASSES = world.OLD_SHAPES + (world.NEW_SHAPE, "other")
COLOUR_CLASSES = tuple(world.COLOURS)
BACKGROUND_CLASSES = tuple(world.BACKGROUNDS)
HEADS = {"shape": SHAPE_CLASSES, "colour": COLOUR_CLASSES, "background": BACKGROUND_CLASSES}
WIDTHS = (32, 64, 128)
FEATURE_DIM = WIDTHS[-1]
ASSET = Path(__file__).resolve().parent / "assets" / "classifier.safetensors"
EVAL_SEED = 20_000  # held-out renders for the JSON record; training streams use the training seed
EVAL_COUNT = 2000
NOISE_RANGE = (0.0, 0.1)
BLUR_PROB = 0.2
BLUR_SIGMA_RANGE = (0.3, 0.7)
COLOUR_SHIFT = 0.04
DEFAULT_STEPS = 1400
DEFAULT_BATCH = 64


def shape_class(shape: str) -> str:
    """The shape head's class of a world shape: itself if known, `other` for amorphous/spiky."""
    return shape if shape in SHAPE_CLASSES else "other"


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(inplace=True)
    )


def silhouette(x: torch.Tensor) -> torch.Tensor:
    """Colour-blind foreground map [B, 1, H, W] in [0, 1]: distance from the border's median colour, over its max.

    The shape head would otherwise have to learn the outline under 24 colour pairs of both contrast
    signs, and first learns the shortcut "foreground area" (square, diamond and cross have the same area).
    """
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    distance = (x - background).norm(dim=1, keepdim=True)
    return distance / distance.amax(dim=(2, 3), keepdim=True).clamp(min=0.1)


class ToyClassifier(nn.Module):
    """Input: the image and its silhouette (4 channels). conv 32 (16x16) -> 64 (8x8, two convs) ->
    128 (4x4, two convs), global average pool, three heads."""

    def __init__(self, widths: Sequence[int] = WIDTHS):
        super().__init__()
        a, b, c = widths
        self.body = nn.Sequential(
            _block(4, a),
            _block(a, b, stride=2),
            _block(b, b),
            _block(b, c, stride=2),
            _block(c, c),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(c, len(classes)) for name, classes in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 128] of images [B, 3, 16, 16] in [-1, 1]."""
        return self.body(torch.cat([x, 2 * silhouette(x) - 1], dim=1)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        return {name: head(feats) for name, head in self.heads.items()}


# ----------------------------------------------------------------------------- data


def random_labelled_items(n: int, rng: np.random.Generator) -> list[world.Item]:
    """Items with the shape class uniform over SHAPE_CLASSES (`other`: half blobs, half spiky)."""
    items = []
    for _ in range(n):
        cls = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
        shape = world.UNKNOWN_SHAPES[int(rng.integers(2))] if cls == "other" else cls
        colour = COLOUR_CLASSES[int(rng.integers(len(COLOUR_CLASSES)))]
        background = BACKGROUND_CLASSES[int(rng.integers(len(BACKGROUND_CLASSES)))]
        word = world.PLACEHOLDER_WORDS[0] if cls == "other" else world.default_word(shape)
        items.append(world.Item(shape, colour, background, word))
    return items


def labels_of(items: Sequence[world.Item]) -> dict[str, torch.Tensor]:
    """Class indices per head."""
    return {
        "shape": torch.tensor([SHAPE_CLASSES.index(shape_class(i.shape)) for i in items]),
        "colour": torch.tensor([COLOUR_CLASSES.index(i.colour) for i in items]),
        "background": torch.tensor([BACKGROUND_CLASSES.index(i.background) for i in items]),
    }


def add_noise(images: torch.Tensor, sigma: Union[float, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Gaussian pixel noise with std `sigma` in [0, 1] units (2 sigma in the [-1, 1] space)."""
    sigma = torch.as_tensor(sigma, dtype=images.dtype).reshape(-1, 1, 1, 1)
    return images + 2 * sigma * torch.randn(images.shape, generator=gen)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """3x3 Gaussian blur with edge replication."""
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * sigma * sigma))
    taps = taps / taps.sum()
    kernel = (taps[:, None] * taps[None, :]).expand(images.shape[1], 1, 3, 3)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel.to(images.dtype), groups=images.shape[1])


def augment(images: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Slight blur (sometimes), a small per-image colour shift, then pixel noise."""
    out = images.clone()
    for i in np.flatnonzero(rng.uniform(size=len(images)) < BLUR_PROB):
        out[i : i + 1] = gaussian_blur(out[i : i + 1], rng.uniform(*BLUR_SIGMA_RANGE))
    shift = torch.from_numpy(rng.uniform(-COLOUR_SHIFT, COLOUR_SHIFT, (len(images), 3, 1, 1))).float()
    sigma = torch.from_numpy(rng.uniform(*NOISE_RANGE, len(images))).float()
    return add_noise(out + 2 * shift, sigma, gen).clamp(-1.5, 1.5)


def training_batch(n: int, rng: np.random.Generator, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    items = random_labelled_items(n, rng)
    images, _ = world.render_batch(items, int(rng.integers(2**31)))
    return augment(images, rng, gen), labels_of(items)


# ----------------------------------------------------------------------------- training


def loss_of(model: nn.Module, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the three heads."""
    logits = model(images)
    return sum(F.cross_entropy(logits[name], labels[name]) for name in HEADS)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def estimate_steps(seconds: float, batch_size: int, probe_steps: int = 10) -> int:
    """Steps that fit in `seconds`, from timing a few throwaway steps."""
    model, rng, gen = ToyClassifier(), np.random.default_rng(0), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters())
    start = time.perf_counter()
    for _ in range(probe_steps):
        images, labels = training_batch(batch_size, rng, gen)
        opt.zero_grad()
        loss_of(model, images, labels).backward()
        opt.step()
    return max(1, int(seconds / ((time.perf_counter() - start) / probe_steps)))


def fit(steps: int, seed: int, batch_size: int = DEFAULT_BATCH, lr: float = 3e-3) -> tuple[ToyClassifier, float]:
    """Train from scratch; returns (model, wall seconds)."""
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=max(1, steps // 50))
        images, labels = training_batch(batch_size, rng, gen)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, images, labels)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s", flush=True)
    return model.eval(), time.perf_counter() - start


def heldout_accuracy(model: nn.Module, count: int, seed: int, noise: float = 0.0) -> dict[str, float]:
    """Accuracy of each head (and all three at once) on fresh renders, optionally with pixel noise."""
    rng = np.random.default_rng(seed)
    items = random_labelled_items(count, rng)
    images, _ = world.render_batch(items, seed + 1)
    if noise > 0:
        images = add_noise(images, noise, torch.Generator().manual_seed(seed + 2))
    pred = predict_indices(model, images)
    truth = labels_of(items)
    hits = {name: pred[name] == truth[name] for name in HEADS}
    out = {name: float(h.float().mean()) for name, h in hits.items()}
    out["all"] = float((hits["shape"] & hits["colour"] & hits["background"]).float().mean())
    return out


def train_classifier(
    out_path: Union[str, Path],
    steps: Optional[int] = None,
    seconds_budget: Optional[float] = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
) -> dict[str, Any]:
    """Train, evaluate on EVAL_COUNT held-out renders (clean and noise 0.1), write weights + JSON; returns the JSON."""
    if steps is None:
        steps = estimate_steps(seconds_budget or 180.0, batch_size)
    cpu_start = time.process_time()
    model, seconds = fit(steps, seed, batch_size)
    cpu_seconds = time.process_time() - cpu_start
    record = {
        "widths": list(WIDTHS),
        "classes": {name: list(classes) for name, classes in HEADS.items()},
        "steps": steps,
        "batch_size": batch_size,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "eval_seed": EVAL_SEED,
        "eval_count": EVAL_COUNT,
        "heldout_clean": heldout_accuracy(model, EVAL_COUNT, EVAL_SEED),
        "heldout_noise_0.1": heldout_accuracy(model, EVAL_COUNT, EVAL_SEED, noise=0.1),
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


# ----------------------------------------------------------------------------- inference


def load_classifier(path: Union[str, Path, None] = None) -> ToyClassifier:
    """The classifier at `path` (default: the shipped asset), in eval mode on the CPU."""
    weights = Path(path) if path is not None else ASSET
    meta_path = weights.with_suffix(".json")
    widths = json.loads(meta_path.read_text(encoding="utf-8"))["widths"] if meta_path.exists() else WIDTHS
    model = ToyClassifier(widths)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


@torch.no_grad()
def predict_indices(model: nn.Module, images: torch.Tensor, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Predicted class indices per head and `features` [B, 128], computed in chunks."""
    model.eval()
    param = next(model.parameters())
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in (*HEADS, "features")}
    for batch in images.split(chunk):
        feats = model.features(batch.to(param.device, param.dtype))
        parts["features"].append(feats.float().cpu())
        for name, head in model.heads.items():
            parts[name].append(head(feats).argmax(dim=1).cpu())
    return {name: torch.cat(p) for name, p in parts.items()}


def classify(model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """Predicted `shape`, `colour`, `background` (class-name lists), their `*_index` tensors and `features`."""
    pred = predict_indices(model, images)
    out: dict[str, Any] = {"features": pred["features"]}
    for name, classes in HEADS.items():
        out[f"{name}_index"] = pred[name]
        out[name] = [classes[i] for i in pred[name].tolist()]
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Train the toy world's evaluator and write it with its JSON record.")
    p.add_argument("--out", default=str(ASSET), help="weights path (.safetensors); the JSON goes beside it")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps (0: what fits in --seconds)")
    p.add_argument("--seconds", type=float, default=180.0, help="time budget when --steps is 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    # one thread: on shared cores two OpenMP threads wait on each other (10x slower when another job runs)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = train_classifier(args.out, args.steps or None, args.seconds, args.seed, args.batch_size)
    keys = ("steps", "seconds", "cpu_seconds", "heldout_clean", "heldout_noise_0.1")
    print(json.dumps({k: record[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
