"""One caching task: one input shard -> one feature shard (runs in a Ray actor or in-process).

A task names its output shard and either an image shard (from make-shards) or, for the plain
folder input, its list of pairs. Samples are read in windows of `batch_size * WINDOW_BATCHES`;
inside a window every (sample, caption variant) is encoded in length-aware batches: sorted by
(bucket, caption length), so a batch holds prompts of similar length and images of one aspect
(similar vision-token counts), which keeps padding small. Samples are written in input order.
An image that cannot be decoded, a sample without caption, or a sample the encoders reject is
skipped and returned as a report row with its key and reason. An input shard whose tar data
cannot be read to its end (corrupt, truncated, a failing `pipe:`) fails the whole task, which
the pool retries and then reports: a transient error heals, a broken shard is named and can be
repaired and recached. The output is written as `<name>.tmp` and renamed when complete, so a
shard file either is whole or does not exist.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dopsd_scale.data.format import DTYPES, FORMAT_VERSION, IMAGE_EXTS, FeatureSample, encode_sample, \
    hash_model_dir, save_val_prompts, variant_name
from dopsd_scale.data.shards import iter_tar_samples
from dopsd_scale.encoders.text import PromptEncoder
from dopsd_scale.encoders.vlm import VLMTeacherContext

from .common import TOOL_VERSION
from .images import assign_bucket, fit_to_bucket, load_rgb

log = logging.getLogger(__name__)
WINDOW_BATCHES = 8


class ShardReadError(OSError):
    """An input shard that cannot be read to its end (retried, then reported as failed)."""


@dataclass
class Pending:
    """A decoded input sample waiting for its features."""

    key: str
    image: Image.Image
    captions: list[str]
    bucket: tuple[int, int]
    meta: dict


class Encoders:
    """The student prompt encoder, the teacher context builder and, optionally, the VAE."""

    def __init__(self, opts: dict):
        device = opts["device"]
        self.prompt = PromptEncoder.from_pipeline(opts["pipeline"], device=device, max_length=opts["text_max_length"])
        self.teacher = VLMTeacherContext.from_pretrained(
            opts["teacher_vlm"], text_encoder=self.prompt.model, text_tokenizer=self.prompt.tokenizer, device=device,
            max_tokens=opts["vlm_max_tokens"], min_pixels=opts["vlm_min_pixels"], max_pixels=opts["vlm_max_pixels"],
        )
        self.vae = None
        if opts["latents"]:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(str(Path(opts["pipeline"]) / "vae")).to(device).eval()

    @torch.no_grad()
    def target_latents(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                              for i in images])
        dist = self.vae.encode(pixels.to(self.vae.device)).latent_dist
        cfg = self.vae.config
        return ((dist.mode() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).float().cpu()


def producer_info(opts: dict, enc: Encoders) -> dict:
    """Everything that changes the features; a directory holds features of one producer only."""
    return {
        "kind": "features",
        "tool_version": TOOL_VERSION,
        "format_version": FORMAT_VERSION,
        "student_encoder": {"path": Path(opts["pipeline"]).resolve().name, **enc.prompt.describe(),
                            "hashes": hash_model_dir(Path(opts["pipeline"]) / "text_encoder")},
        "teacher_context": {"kind": "vlm", "path": Path(opts["teacher_vlm"]).resolve().name,
                            **enc.teacher.describe(), "hashes": hash_model_dir(opts["teacher_vlm"])},
        "latents": opts["latents"],
        "buckets": [list(b) for b in opts["buckets"]],
        "dtype": opts["dtype"],
        "feature_dim": enc.prompt.dim,
        "shard_size": opts["shard_size"],
    }


# ---- reading a task's samples -------------------------------------------------------------------
def _skip(rows: list[dict], key: str, source: str, reason: str) -> None:
    rows.append({"key": key, "source": source, "action": "skipped", "reason": reason})


def _from_image_shard(url: str, buckets: list, rows: list[dict]) -> Iterator[Pending]:
    def on_error(err: Exception) -> None:  # a broken or unreachable shard: the task fails and is retried
        raise ShardReadError(f"{url}: unreadable tar data ({type(err).__name__}: {err})") from err

    for raw in iter_tar_samples(url, on_error):
        key = raw["__key__"]
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        try:
            meta = json.loads(raw["json"]) if "json" in raw else None
        except ValueError as err:
            meta, reason = None, f"unreadable metadata ({err})"
        else:
            reason = "missing metadata (.json member)"
        if meta is None or ext is None:
            _skip(rows, key, url, reason if meta is None else "missing image member")
            continue
        captions = [c for c in meta.get("captions", []) if isinstance(c, str) and c.strip()]
        if not captions:
            _skip(rows, key, url, "missing caption")
            continue
        try:
            image = load_rgb(raw[ext])
        except Exception as err:  # PIL raises many types for bad bytes
            _skip(rows, key, url, f"unreadable image ({type(err).__name__}: {err})")
            continue
        bucket = assign_bucket(image.width, image.height, buckets)
        yield Pending(key, image, captions, bucket, {"source_id": meta.get("source_id", key), "sha256": meta.get("sha256"),
                                                     "caption_fields": meta.get("caption_fields")})


def _from_pairs(pairs: list, buckets: list, rows: list[dict]) -> Iterator[Pending]:
    for key, path, caption in pairs:
        try:
            image = load_rgb(Path(path).read_bytes())
        except Exception as err:
            _skip(rows, key, str(path), f"unreadable image ({type(err).__name__}: {err})")
            continue
        yield Pending(key, image, [caption], assign_bucket(image.width, image.height, buckets), {"source_id": Path(path).name})


def _windows(items: Iterator[Pending], size: int) -> Iterator[list[Pending]]:
    window: list[Pending] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


# ---- the worker ------------------------------------------------------------------------------------
class ShardEncoder:
    """Holds the encoders; turns tasks into feature shards. Ray makes actors of this class."""

    def __init__(self, opts: dict):
        self.opts = opts
        if opts.get("threads"):
            torch.set_num_threads(int(opts["threads"]))
        self.enc = Encoders(opts)
        self.dtype = DTYPES[opts["dtype"]]

    def producer(self) -> dict:
        return producer_info(self.opts, self.enc)

    def write_val_prompts(self, path: str, prompts: list[str]) -> None:
        save_val_prompts(path, prompts, self.enc.prompt.encode(prompts), self.dtype)

    def run(self, task: dict) -> dict:
        """Encode one shard; returns {name, count, rows, seconds}."""
        t0 = time.perf_counter()
        rows: list[dict] = []
        buckets = [tuple(b) for b in self.opts["buckets"]]
        if task.get("source"):
            items = _from_image_shard(task["source"], buckets, rows)
        else:
            items = _from_pairs(task["pairs"], buckets, rows)
        out = Path(self.opts["output_dir"])
        tmp = out / (task["name"] + ".tmp")
        count = 0
        with wds.TarWriter(str(tmp)) as sink:
            for window in _windows(items, self.opts["batch_size"] * WINDOW_BATCHES):
                for sample in self.encode_window(window, rows):
                    sink.write(encode_sample(sample, self.dtype))
                    count += 1
        tmp.replace(out / task["name"])
        return {"name": task["name"], "count": count, "rows": rows, "seconds": time.perf_counter() - t0}

    def encode_window(self, window: list[Pending], rows: list[dict]) -> list[FeatureSample]:
        items = [(i, v) for i, p in enumerate(window) for v in range(len(p.captions))]
        items.sort(key=lambda iv: (window[iv[0]].bucket, len(window[iv[0]].captions[iv[1]])))
        feats: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        size = self.opts["batch_size"]
        for start in range(0, len(items), size):
            feats.update(self._encode_batch(window, items[start : start + size], rows))
        latents = self._latents(window) if self.enc.vae is not None else {}
        failed = {i for i, _ in items if any((i, v) not in feats for v in range(len(window[i].captions)))}
        samples = []
        for i, p in enumerate(window):
            if i in failed:
                continue
            tensors = {}
            for v in range(len(p.captions)):
                tensors[variant_name("student", v)], tensors[variant_name("teacher", v)] = feats[(i, v)]
            if i in latents:
                tensors["latents"] = latents[i]
            meta = {"caption": p.captions[0], "captions": p.captions, "bucket": list(p.bucket),
                    "width": p.image.width, "height": p.image.height, **p.meta}
            samples.append(FeatureSample(p.key, meta, tensors))
        return samples

    def _encode_batch(self, window: list[Pending], batch: list[tuple[int, int]], rows: list[dict]) -> dict:
        """Features of a batch; when the batch fails, sample by sample, skipping the failing ones."""
        try:
            return self._encode(window, batch)
        except Exception as err:  # e.g. a prompt whose tokens would cut the image tokens
            if len(batch) == 1:
                i, v = batch[0]
                _skip(rows, window[i].key, window[i].meta.get("source_id", "?"),
                      f"encoder error (variant {v}: {type(err).__name__}: {err})")
                return {}
            out: dict = {}
            for item in batch:
                out.update(self._encode_batch(window, [item], rows))
            return out

    def _encode(self, window: list[Pending], batch: list[tuple[int, int]]) -> dict:
        captions = [window[i].captions[v] for i, v in batch]
        student = self.enc.prompt.encode(captions)
        teacher = self.enc.teacher.encode([window[i].image for i, _ in batch], captions)
        return {item: (s, t) for item, s, t in zip(batch, student, teacher)}

    def _latents(self, window: list[Pending]) -> dict[int, torch.Tensor]:
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(window):
            by_bucket.setdefault(p.bucket, []).append(i)
        out = {}
        size = self.opts["batch_size"]
        for bucket, idx in by_bucket.items():
            for start in range(0, len(idx), size):
                part = idx[start : start + size]
                lat = self.enc.target_latents([fit_to_bucket(window[i].image, bucket) for i in part])
                out.update(zip(part, lat))
        return out
