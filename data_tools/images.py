"""Image checks, conversion to RGB, and aspect-ratio buckets (shared by make-shards and caching).

Policy (every case is counted and written to the report with its key and reason):
  skipped   - empty file; bytes PIL cannot decode completely (truncated JPEG, garbage); an image
              whose shorter side is below `min_side`; an aspect ratio beyond `max_aspect`
              (either way round); a frame count above one is fine (the first frame is used).
  converted - the ORIGINAL bytes are kept in the image shard (never re-encoded) and the
              conversion happens in :func:`to_rgb` when the image is loaded for encoding:
              alpha (RGBA, LA, P with transparency) is composited on white; 16-bit and 32-bit
              integer images are scaled to 8 bits (PIL's plain `convert` would clip them to
              white); CMYK and other colour spaces go through PIL to RGB; the EXIF orientation
              is applied. Formats outside JPEG/PNG/WebP (BMP, TIFF, GIF...) are re-encoded
              losslessly to PNG, so every shard holds only the three formats a reader expects.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

# Aspect ratios (W:H) of the default bucket list: 11 ratios from 1:2 to 2:1, like the
# reference code's list around 1024^2.
DEFAULT_RATIOS = ("1:2", "9:16", "2:3", "3:4", "4:5", "1:1", "5:4", "4:3", "3:2", "16:9", "2:1")


class ImageRejected(ValueError):
    """The image is skipped; the message is the reason written to the report."""


@dataclass
class ImageInfo:
    """What make-shards records about an accepted image."""

    width: int
    height: int
    mode: str
    ext: str  # tar member extension of the bytes stored
    data: bytes  # the bytes stored: the original ones unless the format had to change
    conversions: list[str]


def make_buckets(
    area: int = 1024 * 1024, ratios: tuple[str, ...] = DEFAULT_RATIOS, multiple: int = 32
) -> list[tuple[int, int]]:
    """(H, W) buckets of about `area` pixels, sides multiples of `multiple`, one per W:H ratio."""
    buckets = []
    for ratio in ratios:
        w_part, h_part = (float(v) for v in ratio.split(":"))
        r = w_part / h_part
        h = max(multiple, round(math.sqrt(area / r) / multiple) * multiple)
        w = max(multiple, round(math.sqrt(area * r) / multiple) * multiple)
        if (h, w) not in buckets:
            buckets.append((h, w))
    return buckets


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket whose aspect ratio is closest in log space (ties: the first listed)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    orientation = img.getexif().get(0x0112, 1)
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else (img.width, img.height)


def probe_image(data: bytes, min_side: int = 0, max_aspect: float = 0.0) -> ImageInfo:
    """Decode `data` completely and apply the policy; raises ImageRejected with the reason."""
    if not data:
        raise ImageRejected("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: a truncated file fails here
            fmt, mode = img.format, img.mode
            width, height = _oriented_size(img)
            conversions = _conversions(img)
            ext, stored = KEEP_FORMATS.get(fmt or ""), data
            if ext is None:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                ext, stored = "png", buf.getvalue()
                conversions.append(f"{fmt} re-encoded losslessly to PNG")
    except ImageRejected:
        raise
    except Exception as err:  # PIL raises many types for bad bytes
        raise ImageRejected(f"unreadable image ({type(err).__name__}: {err})") from None
    if min(width, height) < min_side:
        raise ImageRejected(f"below minimum size: {width}x{height}, the shorter side must be >= {min_side}")
    if max_aspect and max(width / height, height / width) > max_aspect:
        raise ImageRejected(f"extreme aspect ratio: {width}x{height} is beyond {max_aspect}:1")
    return ImageInfo(width, height, mode, ext, stored, conversions)


def _conversions(img: Image.Image) -> list[str]:
    """What :func:`to_rgb` will do to this image, for the report."""
    out = []
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        out.append("alpha composited on white")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        out.append(f"{img.mode} scaled to 8 bits")
    elif img.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA"):
        out.append(f"{img.mode} converted to RGB")
    if img.getexif().get(0x0112, 1) != 1:
        out.append("EXIF orientation applied")
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image following the module's conversion policy."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to RGB (the loader cache-features uses)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket, then centre-crop to it."""
    h, w = bucket
    scale = max(w / image.width, h / image.height)
    resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return resized.crop((left, top, left + w, top + h))


def parse_ratios(text: Optional[str]) -> tuple[str, ...]:
    """'1:1,4:3,3:4' -> ('1:1', '4:3', '3:4'); None -> the default 11 ratios."""
    if not text:
        return DEFAULT_RATIOS
    ratios = tuple(r.strip() for r in text.split(",") if r.strip())
    for r in ratios:
        parts = r.split(":")
        if len(parts) != 2 or not all(p.replace(".", "", 1).isdigit() and float(p) > 0 for p in parts):
            raise ValueError(f"aspect ratio {r!r} is not W:H")
    return ratios
