"""The toy world: 16x16 images of one coloured shape on a plain background, and their captions.

Every caption is exactly "a {colour} {word} on a {background} background". The base model knows
the old shapes (the word is the shape's name); the new concept is a 5-point star called `zorp`;
unknown shapes (random `amorphous` blobs and `spiky` polygons that never have 5 points) carry a
random placeholder word and only serve in-context pretraining and the evaluator's reject class.

Images are float tensors [3, 16, 16] in [-1, 1] (the diffusion model's pixel space). Outlines are
rasterised on a 4x supersampled grid with numpy inside/outside tests and average-pooled, so
edges are antialiased and the soft mask is each pixel's coverage fraction.

A "reference image" shows the target's silhouette, white on black (the shipped base's style) or in
random colours (alpha = the soft mask): it gives position and outline in context, while the colours
must come from the caption.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 16
SUPERSAMPLE = 4
RADIUS_RANGE = (5.5, 6.5)
"""Outer radius in pixels: the largest distance from the centre to the outline, for every shape."""
CENTRE_JITTER = 1.0
STAR_INNER_RATIO = 0.45
SPIKE_COUNTS = (3, 4, 6, 7, 8)  # never 5: that is the star
SPIKE_INNER_RANGE = (0.3, 0.7)
SPIKE_CONVEXITY_MARGIN = 0.7
"""Spiky inner radius <= margin * cos(pi / n): a 3- or 4-spike polygon never degenerates into a triangle or square."""
SPIKE_RADIUS_JITTER = 0.15
BLOB_AMPLITUDE_RANGE = (0.1, 0.25)
BLOB_MAX_ROUNDNESS = 0.7
"""Amorphous blobs are redrawn until min radius / max radius is below this: never a circle."""
REFERENCE_MIN_CONTRAST = 0.5
MASK_THRESHOLD = 0.05

OLD_SHAPES = ("circle", "square", "triangle", "cross", "diamond")
NEW_SHAPE = "star"
NEW_WORD = "zorp"
UNKNOWN_SHAPES = ("amorphous", "spiky")
ALL_SHAPES = OLD_SHAPES + (NEW_SHAPE,) + UNKNOWN_SHAPES
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (245, 230, 40),
    "purple": (150, 30, 200),
    "orange": (245, 130, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
PLACEHOLDER_WORDS = (
    "dax",
    "wug",
    "blick",
    "fep",
    "toma",
    "kiki",
    "bouba",
    "gazzer",
    "lorp",
    "mib",
    "tupa",
    "zibber",
    "nork",
    "pilk",
    "vash",
    "quell",
    "drem",
    "snib",
    "yarp",
    "flim",
)
CAPTION_FRAME = ("a", "on", "background")
VOCABULARY = sorted(
    set(CAPTION_FRAME) | set(COLOURS) | set(BACKGROUNDS) | set(OLD_SHAPES) | {NEW_WORD} | set(PLACEHOLDER_WORDS)
)
TRAIN_CONCEPT_COMBOS = (
    ("red", "black"),
    ("green", "white"),
    ("blue", "gray"),
    ("yellow", "black"),
    ("purple", "white"),
    ("orange", "gray"),
    ("cyan", "black"),
    ("pink", "white"),
)
"""The 8 (colour, background) pairs of the concept's fine-tuning images: every colour once, backgrounds 3/3/2."""
KINDS = ("old", "unknown", "concept")


@dataclass(frozen=True)
class Item:
    """One image's content. `word` is the caption's shape word (the shape name for old shapes)."""

    shape: str
    colour: str
    background: str
    word: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.word} on a {self.background} background"


def default_word(shape: str) -> str:
    """The caption word of a known shape (unknown shapes have no default: pick a placeholder)."""
    if shape in OLD_SHAPES:
        return shape
    if shape == NEW_SHAPE:
        return NEW_WORD
    raise ValueError(f"shape {shape!r} has no fixed word")


def known_item(shape: str, colour: str, background: str) -> Item:
    return Item(shape, colour, background, default_word(shape))


# ----------------------------------------------------------------------------- outlines


def _subpixel_grid() -> tuple[np.ndarray, np.ndarray]:
    """(x, y) pixel coordinates of the supersampled grid's sample centres, each [S*16, S*16]."""
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    return np.meshgrid(coords, coords, indexing="xy")


GRID_X, GRID_Y = _subpixel_grid()


def _inside_polygon(px: np.ndarray, py: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd ray casting for all points at once; vertices [K, 2] as (x, y)."""
    inside = np.zeros(px.shape, dtype=bool)
    x1, y1 = vertices[:, 0], vertices[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2):
        if b == d:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (b > py) != (d > py)
        x_cross = a + (py - b) * (c - a) / (d - b)
        inside ^= crosses & (px < x_cross)
    return inside


def _polar_polygon(radii: np.ndarray, angles: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """Vertices at (radius, angle) around the centre; angle 0 points right, -pi/2 points up (y grows down)."""
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _regular_vertices(n: int, radius: float, cx: float, cy: float, start: float) -> np.ndarray:
    angles = start + 2 * math.pi * np.arange(n) / n
    return _polar_polygon(np.full(n, radius), angles, cx, cy)


def star_vertices(radius: float, cx: float, cy: float) -> np.ndarray:
    """The regular 5-point star, one point straight up."""
    angles = -math.pi / 2 + math.pi * np.arange(10) / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, STAR_INNER_RATIO * radius)
    return _polar_polygon(radii, angles, cx, cy)


def spiky_vertices(radius: float, cx: float, cy: float, rng: np.random.Generator) -> np.ndarray:
    """A random n-spike polygon (n never 5): random inner ratio, rotation and per-vertex radius jitter."""
    n = int(rng.choice(SPIKE_COUNTS))
    low, high = SPIKE_INNER_RANGE
    inner = rng.uniform(low, min(high, SPIKE_CONVEXITY_MARGIN * math.cos(math.pi / n)))
    rotation = rng.uniform(0, 2 * math.pi / n)
    angles = rotation + math.pi * np.arange(2 * n) / n
    radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    radii = radii * rng.uniform(1 - SPIKE_RADIUS_JITTER, 1 + SPIKE_RADIUS_JITTER, 2 * n)
    return _polar_polygon(radius * radii / radii.max(), angles, cx, cy)


def blob_radius_function(rng: np.random.Generator):
    """r(theta) / R of a smooth random closed curve: 1 + sum_{k=2..4} a_k cos(k theta + phi_k), max 1."""
    probe = np.linspace(0, 2 * math.pi, 720, endpoint=False)
    while True:
        amps = rng.uniform(*BLOB_AMPLITUDE_RANGE, 3)
        phases = rng.uniform(0, 2 * math.pi, 3)

        def shape(theta, amps=amps, phases=phases):
            return 1 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 4), amps, phases))

        values = shape(probe)
        if values.min() / values.max() < BLOB_MAX_ROUNDNESS:
            peak = values.max()
            return lambda theta: shape(theta) / peak


def outline_inside(shape: str, radius: float, cx: float, cy: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean inside test of the shape on the supersampled grid [64, 64]."""
    dx, dy = GRID_X - cx, GRID_Y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = radius / math.sqrt(2)
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    if shape == "cross":
        arm = radius / math.sqrt(1 + 1 / 9)  # the arm ends' corners lie on the outer radius
        thick = arm / 3  # half-thickness: the arms are 1/3 of the cross's size thick
        in_box = (np.abs(dx) <= arm) & (np.abs(dy) <= arm)
        return in_box & ((np.abs(dx) <= thick) | (np.abs(dy) <= thick))
    if shape == "triangle":
        return _inside_polygon(GRID_X, GRID_Y, _regular_vertices(3, radius, cx, cy, -math.pi / 2))
    if shape == NEW_SHAPE:
        return _inside_polygon(GRID_X, GRID_Y, star_vertices(radius, cx, cy))
    if shape == "spiky":
        return _inside_polygon(GRID_X, GRID_Y, spiky_vertices(radius, cx, cy, rng))
    if shape == "amorphous":
        r_of = blob_radius_function(rng)
        return np.hypot(dx, dy) <= radius * r_of(np.arctan2(dy, dx))
    raise ValueError(f"unknown shape {shape!r}; expected one of {ALL_SHAPES}")


# ----------------------------------------------------------------------------- rendering


def rgb01(colour: Sequence[int]) -> np.ndarray:
    return np.asarray(colour, dtype=np.float64) / 255.0


def soft_mask(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Coverage fraction [16, 16] of a shape with random size and position (and outline, if random)."""
    radius = rng.uniform(*RADIUS_RANGE)
    cx, cy = IMAGE_SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2)
    inside = outline_inside(shape, radius, cx, cy, rng)
    s = SUPERSAMPLE
    return inside.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s).mean(axis=(1, 3))


def composite(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> torch.Tensor:
    """Foreground over background with alpha = mask, as [3, 16, 16] in [-1, 1]."""
    rgb = mask[None] * fg[:, None, None] + (1 - mask[None]) * bg[:, None, None]
    return torch.from_numpy(rgb * 2 - 1).float()


def render(item: Item, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [3, 16, 16] in [-1, 1], soft mask [16, 16] in [0, 1]) of one item."""
    mask = soft_mask(item.shape, rng)
    image = composite(mask, rgb01(COLOURS[item.colour]), rgb01(BACKGROUNDS[item.background]))
    return image, torch.from_numpy(mask).float()


def render_batch(items: Sequence[Item], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [B, 3, 16, 16], masks [B, 16, 16]); the same items and seed give the same pixels."""
    rng = np.random.default_rng(seed)
    pairs = [render(item, rng) for item in items]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


# ----------------------------------------------------------------------------- reference images


def random_colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) uniform over RGB in [0, 1], redrawn until they clearly differ."""
    while True:
        fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if np.linalg.norm(fg - bg) >= REFERENCE_MIN_CONTRAST:
            return fg, bg


REFERENCE_STYLES = ("silhouette", "random_colours")
"""How a reference shows the target's outline: `silhouette` (white on black) or `random_colours`
(recoloured with random foreground and background colours). Neither carries the target's colours."""


def reference_colours(style: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if style == "silhouette":
        return np.ones(3), np.zeros(3)
    if style == "random_colours":
        return random_colour_pair(rng)
    raise ValueError(f"reference style {style!r} is not one of {REFERENCE_STYLES}")


def reference_from_mask(mask: torch.Tensor, rng: np.random.Generator, style: str = "silhouette") -> torch.Tensor:
    """The target's soft mask [16, 16] drawn as a reference image [3, 16, 16] in [-1, 1]."""
    return composite(np.asarray(mask, dtype=np.float64), *reference_colours(style, rng))


def references_from_masks(masks: torch.Tensor, seed: int, style: str = "silhouette") -> torch.Tensor:
    """Reference images [B, 3, 16, 16] of a batch of masks [B, 16, 16]."""
    rng = np.random.default_rng(seed)
    return torch.stack([reference_from_mask(m, rng, style) for m in masks])


def _border(rgb: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of an [H, W, 3] image, as [N, 3]."""
    return np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])


def estimate_mask(image: torch.Tensor) -> np.ndarray:
    """Soft foreground mask [16, 16] of an image alone: distance from the border's median colour, normalised."""
    rgb = (image.detach().cpu().double().numpy().transpose(1, 2, 0) + 1) / 2
    background = np.median(_border(rgb), axis=0)
    distance = np.linalg.norm(rgb - background, axis=-1)
    peak = distance.max()
    if peak <= 0:
        return np.zeros(distance.shape)
    mask = np.clip(distance / peak, 0, 1)
    return np.where(mask < MASK_THRESHOLD, 0.0, mask)


def reference_from_image(image: torch.Tensor, seed: int, style: str = "silhouette") -> torch.Tensor:
    """A reference image [3, 16, 16] from an image [3, 16, 16] in [-1, 1] alone (e.g. a real image file)."""
    return composite(estimate_mask(image), *reference_colours(style, np.random.default_rng(seed)))


# ----------------------------------------------------------------------------- conversions


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[3, H, W] or [B, 3, H, W] in [-1, 1] -> uint8 HWC (or BHWC)."""
    x = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC (or BHWC) -> [3, H, W] (or [B, 3, H, W]) float in [-1, 1]."""
    x = torch.from_numpy(np.array(array, dtype=np.float32)) / 127.5 - 1
    return x.movedim(-1, -3).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(image))


def from_pil(image: Image.Image) -> torch.Tensor:
    return from_uint8(np.asarray(image.convert("RGB")))


# ----------------------------------------------------------------------------- prompt sets


def old_items() -> list[Item]:
    """Every old shape in every colour on every background (5 x 8 x 3 = 120)."""
    return [known_item(s, c, b) for s in OLD_SHAPES for c in COLOURS for b in BACKGROUNDS]


def concept_items() -> list[Item]:
    """The star (`zorp`) in all 24 colour/background combinations."""
    return [known_item(NEW_SHAPE, c, b) for c in COLOURS for b in BACKGROUNDS]


def train_concept_items() -> list[Item]:
    """The star in the 8 fine-tuning combinations (TRAIN_CONCEPT_COMBOS)."""
    return [known_item(NEW_SHAPE, c, b) for c, b in TRAIN_CONCEPT_COMBOS]


def heldout_concept_items() -> list[Item]:
    """The star in the 16 combinations never shown in fine-tuning."""
    train = set(TRAIN_CONCEPT_COMBOS)
    return [item for item in concept_items() if (item.colour, item.background) not in train]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def random_item(kind: str, rng: np.random.Generator) -> Item:
    """One item of a kind: `old` (old shape, own word), `unknown` (blob or spiky, placeholder), `concept`."""
    colour, background = _pick(rng, list(COLOURS)), _pick(rng, list(BACKGROUNDS))
    if kind == "old":
        return known_item(_pick(rng, OLD_SHAPES), colour, background)
    if kind == "unknown":
        return Item(_pick(rng, UNKNOWN_SHAPES), colour, background, _pick(rng, PLACEHOLDER_WORDS))
    if kind == "concept":
        return known_item(NEW_SHAPE, colour, background)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def random_items(n: int, rng: np.random.Generator, kinds: Union[Sequence[str], Mapping[str, float]]) -> list[Item]:
    """n random items; `kinds` is a sequence (each kind equally likely) or a mapping kind -> weight."""
    weights = dict(kinds) if isinstance(kinds, Mapping) else {k: 1.0 for k in kinds}
    names = list(weights)
    p = np.asarray([weights[k] for k in names], dtype=np.float64)
    picks = rng.choice(len(names), size=n, p=p / p.sum())
    return [random_item(names[int(i)], rng) for i in picks]


# ----------------------------------------------------------------------------- files


def write_pairs(out_dir: Union[str, Path], items: Sequence[Item], seed: int) -> Path:
    """A folder of `<key>.png` (lossless) + `<key>.txt` (caption) pairs, keys 000000, 000001, ..."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, _ = render_batch(items, seed)
    for i, (item, image) in enumerate(zip(items, images)):
        to_pil(image).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(item.caption + "\n", encoding="utf-8")
    return out
