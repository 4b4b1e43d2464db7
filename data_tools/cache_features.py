"""`dopsd cache-features`: image-text pairs -> feature shards (single process).

Reads a folder of `<key>.<image>` + `<key>.txt` pairs, assigns each image an aspect bucket,
runs the student prompt encoder and the teacher context builder (and optionally the VAE for
target latents), and writes WebDataset feature shards plus `manifest.json`, a report of skipped
samples and `val_prompts.safetensors`. Shards are written to a temporary name and recorded in
the manifest when complete, so a rerun skips finished shards; a directory whose manifest was
produced differently is refused.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dopsd_scale.data.format import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    VAL_PROMPTS,
    FeatureSample,
    Manifest,
    encode_sample,
    hash_model_dir,
    save_val_prompts,
)
from dopsd_scale.encoders.text import PromptEncoder
from dopsd_scale.encoders.vlm import VLMTeacherContext

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TOOL_VERSION = "0.1.0"
DEFAULT_VAL_PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a black background",
    "a green square on a white background",
    "a purple circle on an orange background",
]


class ManifestMismatch(RuntimeError):
    pass


@dataclass
class CacheOptions:
    input_dir: str
    output_dir: str
    pipeline: str
    """Diffusers pipeline directory: tokenizer, text_encoder (and vae for --latents)."""
    teacher_vlm: str
    """Qwen3-VL directory; its language model is replaced by the pipeline's text encoder."""
    buckets: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 1024)])
    shard_size: int = 256
    dtype: str = "bfloat16"
    latents: bool = False
    device: str = "cpu"
    batch_size: int = 8
    text_max_length: int = 512
    vlm_max_tokens: int = 1024
    vlm_min_pixels: int = 512 * 512
    vlm_max_pixels: int = 768 * 768
    val_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_VAL_PROMPTS))


# ---- inputs ---------------------------------------------------------------------------------
def find_pairs(input_dir: str | Path, report: list[dict]) -> list[tuple[str, Path, str]]:
    """(key, image path, caption) for every complete pair, sorted by key; others go to `report`."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input directory not found: {root}")
    pairs = []
    for image in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        key, caption_file = image.stem, image.with_suffix(".txt")
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            report.append({"key": key, "file": str(image), "reason": "missing caption file"})
            continue
        except UnicodeDecodeError:
            report.append({"key": key, "file": str(caption_file), "reason": "caption is not UTF-8"})
            continue
        if not caption:
            report.append({"key": key, "file": str(caption_file), "reason": "empty caption"})
            continue
        pairs.append((key, image, caption))
    return pairs


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket whose aspect ratio is closest in log space."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket, then centre-crop to it."""
    h, w = bucket
    scale = max(w / image.width, h / image.height)
    resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return resized.crop((left, top, left + w, top + h))


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


# ---- encoders -------------------------------------------------------------------------------
class Encoders:
    def __init__(self, opts: CacheOptions):
        self.prompt = PromptEncoder.from_pipeline(opts.pipeline, device=opts.device, max_length=opts.text_max_length)
        self.teacher = VLMTeacherContext.from_pretrained(
            opts.teacher_vlm,
            text_encoder=self.prompt.model,
            text_tokenizer=self.prompt.tokenizer,
            device=opts.device,
            max_tokens=opts.vlm_max_tokens,
            min_pixels=opts.vlm_min_pixels,
            max_pixels=opts.vlm_max_pixels,
        )
        self.vae = None
        if opts.latents:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(str(Path(opts.pipeline) / "vae")).to(opts.device).eval()

    @torch.no_grad()
    def target_latents(self, images: list[Image.Image]) -> torch.Tensor:
        import numpy as np

        pixels = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for i in images])
        dist = self.vae.encode(pixels.to(self.vae.device)).latent_dist
        cfg = self.vae.config
        return ((dist.mode() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).float().cpu()


def producer_info(opts: CacheOptions, enc: Encoders) -> dict:
    """Everything that changes the features; a directory holds features of one producer only."""
    return {
        "tool_version": TOOL_VERSION,
        "format_version": FORMAT_VERSION,
        "student_encoder": {"path": str(Path(opts.pipeline).resolve().name), **enc.prompt.describe(),
                            "hashes": hash_model_dir(Path(opts.pipeline) / "text_encoder")},
        "teacher_context": {"kind": "vlm", "path": str(Path(opts.teacher_vlm).resolve().name),
                            **enc.teacher.describe(), "hashes": hash_model_dir(opts.teacher_vlm)},
        "latents": opts.latents,
        "buckets": [list(b) for b in opts.buckets],
        "dtype": opts.dtype,
        "feature_dim": enc.prompt.dim,
        "shard_size": opts.shard_size,
    }


def check_or_create_manifest(out: Path, producer: dict) -> Manifest:
    if (out / MANIFEST).is_file():
        existing = Manifest.load(out)
        if existing.producer != producer:
            diff = sorted(k for k in set(existing.producer) | set(producer)
                          if existing.producer.get(k) != producer.get(k))
            raise ManifestMismatch(
                f"{out / MANIFEST}: features here were produced differently (differs in: {', '.join(diff)}); "
                "use another output directory"
            )
        return existing
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(producer=producer)
    manifest.save(out)
    return manifest


# ---- the tool --------------------------------------------------------------------------------
def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def encode_pairs(pairs: list[tuple[str, Path, str]], opts: CacheOptions, enc: Encoders,
                 report: list[dict]) -> Iterator[FeatureSample]:
    for chunk in _chunks(pairs, opts.batch_size):
        loaded = []
        for key, path, caption in chunk:
            try:
                loaded.append((key, load_image(path), caption))
            except (UnidentifiedImageError, OSError) as err:
                report.append({"key": key, "file": str(path), "reason": f"unreadable image: {err}"})
        if not loaded:
            continue
        captions = [c for _, _, c in loaded]
        student = enc.prompt.encode(captions)
        teacher = enc.teacher.encode([img for _, img, _ in loaded], captions)
        for i, (key, img, caption) in enumerate(loaded):
            bucket = assign_bucket(img.width, img.height, opts.buckets)
            tensors = {"student": student[i], "teacher": teacher[i]}
            if enc.vae is not None:
                tensors["latents"] = enc.target_latents([fit_to_bucket(img, bucket)])[0]
            meta = {"caption": caption, "bucket": list(bucket), "width": img.width, "height": img.height}
            yield FeatureSample(key=key, meta=meta, tensors=tensors)


def cache_features(opts: CacheOptions) -> dict:
    """Run the tool; returns a summary (also written to `summary.json`)."""
    out = Path(opts.output_dir)
    report: list[dict] = []
    pairs = find_pairs(opts.input_dir, report)
    enc = Encoders(opts)
    manifest = check_or_create_manifest(out, producer_info(opts, enc))
    dtype = DTYPES[opts.dtype]
    written = skipped_shards = 0
    for index, shard_pairs in enumerate(tqdm(list(_chunks(pairs, opts.shard_size)), desc="shards")):
        name = f"features-{index:06d}.tar"
        if name in manifest.shards:
            skipped_shards += 1
            continue
        tmp = out / (name + ".tmp")
        count = 0
        with wds.TarWriter(str(tmp)) as sink:
            for sample in encode_pairs(shard_pairs, opts, enc, report):
                sink.write(encode_sample(sample, dtype))
                count += 1
        tmp.replace(out / name)
        manifest.shards[name] = count
        manifest.save(out)
        written += count
    val_feats = enc.prompt.encode(opts.val_prompts)
    save_val_prompts(out / VAL_PROMPTS, opts.val_prompts, val_feats, dtype)
    with open(out / "report.jsonl", "a", encoding="utf-8") as f:
        for row in report:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {"pairs": len(pairs), "samples_written": written, "shards_resumed": skipped_shards,
               "skipped": len(report), "total_samples": manifest.num_samples, "options": asdict(opts)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
