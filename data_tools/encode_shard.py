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
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from dopsd_scale.contexts import CachingEncoders, ContextItem, context_class
from dopsd_scale.data.format import (
    DTYPES,
    FORMAT_VERSION,
    IMAGE_EXTS,
    FeatureSample,
    encode_sample,
    hash_model_dir,
    save_val_prompts,
    variant_name,
)
from dopsd_scale.data.shards import iter_tar_samples
from dopsd_scale.models import get_spec

from .common import TOOL_VERSION
from .images import assign_bucket, fit_to_bucket, load_rgb

log = logging.getLogger(__name__)
WINDOW_BATCHES = 8
REFERENCE_MEMBER = re.compile(r"^ref_(\d+)\.(jpg|jpeg|png|webp)$")


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
    fields: list[str] = field(default_factory=list)
    references: list[Image.Image] = field(default_factory=list)


def build_encoders(opts: dict):
    """(model spec, the student's encoders, the teacher context) of a caching worker."""
    spec = get_spec(opts["model_name"], opts["pipeline"])
    prompt = spec.prompt_encoder(opts["device"], opts["text_max_length"])
    encoders = CachingEncoders(spec=spec, prompt=prompt, options=opts)
    context = context_class(opts["teacher_context"])(encoders, opts)
    return spec, encoders, context


def producer_info(opts: dict, encoders: CachingEncoders, context) -> dict:
    """Everything that changes the features; a directory holds features of one producer only."""
    pipeline = Path(opts["pipeline"])
    text_dir = pipeline / "text_encoder"
    return {
        "kind": "features",
        "tool_version": TOOL_VERSION,
        "format_version": FORMAT_VERSION,
        "model": {"name": encoders.spec.name, "path": pipeline.resolve().name},
        "student_encoder": {
            "path": pipeline.resolve().name,
            **encoders.prompt.describe(),
            "hashes": hash_model_dir(text_dir) if text_dir.is_dir() else {},
        },
        "teacher_context": {"kind": context.name, **context.describe()},
        "latents": encoders.latent.describe() if opts["latents"] else False,
        "buckets": [list(b) for b in opts["buckets"]],
        "dtype": opts["dtype"],
        "feature_dim": encoders.prompt.dim,
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
        captions, fields = _captions(meta)
        if not captions:
            _skip(rows, key, url, "missing caption")
            continue
        try:
            image = load_rgb(raw[ext])
            references = [load_rgb(raw[name]) for name in _reference_members(raw)]
        except Exception as err:  # PIL raises many types for bad bytes
            _skip(rows, key, url, f"unreadable image ({type(err).__name__}: {err})")
            continue
        bucket = assign_bucket(image.width, image.height, buckets)
        info = {"source_id": meta.get("source_id", key), "sha256": meta.get("sha256"), "caption_fields": fields}
        yield Pending(key, image, captions, bucket, info, fields, references)


def _captions(meta: dict) -> tuple[list[str], list[str]]:
    """The non-empty caption variants and the names of their columns (`caption_i` when unnamed)."""
    captions = meta.get("captions", [])
    names = meta.get("caption_fields") or []
    kept = [
        (c, names[i] if i < len(names) else f"caption_{i}")
        for i, c in enumerate(captions)
        if isinstance(c, str) and c.strip()
    ]
    return [c for c, _ in kept], [n for _, n in kept]


def _reference_members(raw: dict) -> list[str]:
    """Extra reference images of a sample (`<key>.ref_<i>.<ext>` members), in index order."""
    found = [(int(m.group(1)), name) for name in raw if (m := REFERENCE_MEMBER.match(name))]
    return [name for _, name in sorted(found)]


def _from_pairs(pairs: list, buckets: list, rows: list[dict]) -> Iterator[Pending]:
    for key, path, caption in pairs:
        try:
            image = load_rgb(Path(path).read_bytes())
        except Exception as err:
            _skip(rows, key, str(path), f"unreadable image ({type(err).__name__}: {err})")
            continue
        yield Pending(
            key,
            image,
            [caption],
            assign_bucket(image.width, image.height, buckets),
            {"source_id": Path(path).name},
            ["caption"],
        )


def _windows(items: Iterator[Pending], size: int) -> Iterator[list[Pending]]:
    window: list[Pending] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def context_item(p: Pending, teacher_only: set[str]) -> ContextItem:
    """What the context sees: the bucket crop (the very pixels of the target latents)."""
    student = [c for c, f in zip(p.captions, p.fields) if f not in teacher_only]
    return ContextItem(
        key=p.key,
        image=fit_to_bucket(p.image, p.bucket),
        captions=student,
        fields=dict(zip(p.fields, p.captions)),
        references=[fit_to_bucket(r, p.bucket) for r in p.references],
        bucket=p.bucket,
    )


# ---- the worker ------------------------------------------------------------------------------------
class ShardEncoder:
    """Holds the encoders and the teacher context; turns tasks into feature shards (Ray actors)."""

    def __init__(self, opts: dict):
        self.opts = opts
        if opts.get("threads"):
            torch.set_num_threads(int(opts["threads"]))
        self.spec, self.enc, self.context = build_encoders(opts)
        self.dtype = DTYPES[opts["dtype"]]

    def producer(self) -> dict:
        return producer_info(self.opts, self.enc, self.context)

    def write_val_prompts(self, path: str, prompts: list[str]) -> None:
        save_val_prompts(path, prompts, self.enc.encode_prompts(prompts), self.dtype)

    def run(self, task: dict) -> dict:
        """Encode one shard; returns {name, count, rows, seconds}."""
        t0 = time.perf_counter()
        rows: list[dict] = []
        buckets = [tuple(b) for b in self.opts["buckets"]]
        if task.get("prompts") is not None:
            return self.run_prompts(task, t0)
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

    def run_prompts(self, task: dict, t0: float) -> dict:
        """A shard of prompt-only samples (an anchor set): student features, teacher = the same prompt."""
        out = Path(self.opts["output_dir"])
        tmp = out / (task["name"] + ".tmp")
        items = [
            ContextItem(key=key, image=None, captions=captions, bucket=tuple(bucket))
            for key, captions, bucket in task["prompts"]
        ]
        student = self._student_features(items)
        teacher = self.context.encode(items, [student[i.key] for i in items])
        with wds.TarWriter(str(tmp)) as sink:
            for item, context in zip(items, teacher):
                tensors = {variant_name("student", v): f for v, f in enumerate(student[item.key])}
                meta = {
                    "caption": item.captions[0],
                    "captions": item.captions,
                    "bucket": list(item.bucket),
                    "prompt_only": True,
                }
                sink.write(encode_sample(FeatureSample(item.key, meta, {**tensors, **context}), self.dtype))
        tmp.replace(out / task["name"])
        return {"name": task["name"], "count": len(items), "rows": [], "seconds": time.perf_counter() - t0}

    def encode_window(self, window: list[Pending], rows: list[dict]) -> list[FeatureSample]:
        """Feature samples of a window, in input order; a sample that fails is reported and skipped."""
        teacher_only = self.context.teacher_only_fields()
        items = []
        for p in window:
            item = context_item(p, teacher_only)
            reason = "no caption for the student" if not item.captions else self.context.missing(item)
            if reason:
                _skip(rows, p.key, p.meta.get("source_id", "?"), reason)
            else:
                items.append((p, item))
        student = self._student_features([item for _, item in items])
        encoded = self._context_features(items, student, rows)
        latents = self._latents([item for _, item, _ in encoded]) if self.opts["latents"] else {}
        samples = []
        for p, item, teacher in encoded:
            tensors = {variant_name("student", v): f for v, f in enumerate(student[item.key])}
            tensors.update(teacher)
            if item.key in latents:
                tensors["latents"] = latents[item.key]
            meta = {
                "caption": item.captions[0],
                "captions": item.captions,
                "bucket": list(p.bucket),
                "width": p.image.width,
                "height": p.image.height,
                **p.meta,
            }
            samples.append(FeatureSample(p.key, meta, tensors))
        return samples

    def _student_features(self, items: list[ContextItem]) -> dict[str, list[torch.Tensor]]:
        """Every caption variant, in length-aware batches (sorted by bucket and caption length)."""
        order = sorted(
            ((j, v) for j, item in enumerate(items) for v in range(len(item.captions))),
            key=lambda jv: (items[jv[0]].bucket, len(items[jv[0]].captions[jv[1]])),
        )
        feats = self.enc.encode_prompts([items[j].captions[v] for j, v in order])
        out: dict[str, list] = {item.key: [None] * len(item.captions) for item in items}
        for (j, v), f in zip(order, feats):
            out[items[j].key][v] = f
        return out

    def _context_features(self, items: list, student: dict, rows: list[dict]) -> list:
        """(pending, item, teacher tensors) per sample; a failing batch is retried one by one."""
        size = self.opts["batch_size"]
        out = []
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            try:
                tensors = self.context.encode([i for _, i in chunk], [student[i.key] for _, i in chunk])
                out.extend((p, i, t) for (p, i), t in zip(chunk, tensors))
            except Exception:  # e.g. a prompt whose tokens would cut the image tokens
                for p, item in chunk:
                    try:
                        out.append((p, item, self.context.encode([item], [student[item.key]])[0]))
                    except Exception as err:
                        _skip(
                            rows,
                            p.key,
                            p.meta.get("source_id", "?"),
                            f"encoder error ({self.context.name}: {type(err).__name__}: {err})",
                        )
        return out

    def _latents(self, items: list[ContextItem]) -> dict[str, torch.Tensor]:
        """Target latents of the bucket crops, batched per bucket."""
        by_bucket: dict[tuple[int, int], list[ContextItem]] = {}
        for item in items:
            by_bucket.setdefault(item.bucket, []).append(item)
        out = {}
        size = self.opts["batch_size"]
        for group in by_bucket.values():
            for start in range(0, len(group), size):
                part = group[start : start + size]
                out.update(zip([i.key for i in part], self.enc.latent.encode([i.image for i in part])))
        return out
