"""Synthetic image-text pairs for the built-in tiny default and the tests.

Coloured shapes on coloured backgrounds with a caption that states them, in a folder of
`<key>.png` + `<key>.txt` pairs: the simplest input layout `cache-features` reads.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ((32, 32), (32, 48), (48, 32), (64, 64))


def draw_pair(rng: random.Random) -> tuple[Image.Image, str]:
    w, h = rng.choice(SIZES)
    fg, bg = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    img = Image.new("RGB", (w, h), COLOURS[bg])
    draw = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.25, 0.4)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[fg])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg])
    return img, f"a {fg} {shape} on a {bg} background"


def make_synthetic_pairs(out_dir: str | Path, count: int = 64, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        img, caption = draw_pair(rng)
        img.save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(caption + "\n", encoding="utf-8")
    return out
