"""`dopsd cache-features`: image shards (or a folder of pairs) -> feature shards.

Input: image shards from `make-shards` (a directory, glob or brace pattern, or `pipe:` specs
with `--input-manifest`), or a plain folder of `<key>.<image>` + `<key>.txt` pairs. Each input
shard becomes one feature shard `features-<i>.tar` (i = its position in the input list; the
manifest's `sources` names the image shard), written by one task: in this process, or spread
over Ray actors, one per GPU (see `dopsd_scale/task_pool.py`). Every caption variant is encoded (see
`dopsd_scale.data.format`). The driver alone writes the manifest, after each finished shard,
and `journal.jsonl` (each finished shard's report rows): a rerun resumes at the first unfinished
shard and never recomputes a finished one; a directory whose manifest was produced by other
encoders, settings or inputs is refused. A shard that keeps failing is retried, then reported
(the run goes on with the others and exits non-zero). `report.jsonl` lists every skipped sample
and failed shard with its key and reason; `summary.json` holds the counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from dopsd_scale.contexts import context_class
from dopsd_scale.data.format import MANIFEST, VAL_PROMPTS, Manifest
from dopsd_scale.data.shards import resolve_shards, shard_name
from dopsd_scale.task_pool import make_pool

from .common import InputError, ManifestMismatch, check_or_create_manifest, format_counts, reason_counts, write_report
from .encode_shard import ShardEncoder
from .prompts import plan_prompt_tasks

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
JOURNAL = "journal.jsonl"
DEFAULT_VAL_PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a black background",
    "a green square on a white background",
    "a purple circle on an orange background",
]
__all__ = ["CacheOptions", "ManifestMismatch", "cache_features", "find_pairs"]


@dataclass
class CacheOptions:
    input_dir: str
    """Image shards (directory, glob, brace or pipe: spec) or a folder of pairs."""
    output_dir: str
    pipeline: str
    """Model directory: a diffusers pipeline (tokenizer, text_encoder, vae) or a toy model."""
    teacher_vlm: Optional[str] = None
    """`vlm` context: Qwen3-VL directory; its language model is replaced by the pipeline's text encoder."""
    model_name: str = "auto"
    """Model spec of the pipeline (`auto`: from model_index.json / toyworld.json)."""
    teacher_context: str = "auto"
    """Teacher context (see dopsd_scale.contexts); `auto`: the model family's recipe."""
    teacher_caption_field: Optional[str] = None
    """`enhanced_prompt`: the caption column the teacher reads (never shown to the student)."""
    instruction: Optional[str] = None
    """`edit_reference`: the editing instruction after the prompt (None: the reference code's)."""
    extra_references: bool = False
    """`edit_reference`: also give the sample's extra reference images (multi-reference)."""
    prompts_only: bool = False
    """Cache prompt-only samples (an anchor set): the input's captions, no images, `prompt` context."""
    caption_columns: Optional[list[str]] = None
    """--prompts-only from a table: its caption columns (default: caption, text or prompt)."""
    vlm_positions: str = "vlm"
    """`vlm`: keep the VLM's own rotary positions (`vlm`, the reference code) or the text encoder's (`text`)."""
    buckets: list[tuple[int, int]] = field(default_factory=list)
    """(H, W) buckets; empty: the image shards' own list (1024x1024 for a folder of pairs)."""
    shard_size: int = 256
    """Pairs per feature shard for folder input (image shards map one to one)."""
    dtype: str = "bfloat16"
    latents: bool = False
    device: str = "cpu"
    batch_size: int = 8
    text_max_length: Optional[int] = None
    """Prompt tokens (None: the model family's own; FLUX.2-klein only takes its pipeline's 512)."""
    vlm_max_tokens: int = 1024
    vlm_min_pixels: int = 512 * 512
    vlm_max_pixels: int = 768 * 768
    val_prompts: Optional[list[str]] = None
    """Validation prompts cached beside the shards (default: a few fixed ones; for --prompts-only
    the first 8 anchor prompts)."""
    input_manifest: Optional[str] = None
    """The image shards' manifest.json when the input is a pipe: spec."""
    actors: int = 0
    """Ray actors (one GPU each on cuda); 0 = run in this process unless `ray_address` is given."""
    ray_address: Optional[str] = None
    """Ray cluster to join (`auto`, `host:port`); none = a private local cluster when actors > 0."""
    retries: int = 2
    """Extra tries of a failing shard before it is reported as failed."""
    threads: int = 0
    """torch threads per worker (0 = torch's default)."""


# ---- inputs -------------------------------------------------------------------------------------
def find_pairs(input_dir: str | Path, report: list[dict]) -> list[tuple[str, Path, str]]:
    """(key, image path, caption) for every complete pair, sorted by key; others go to `report`."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input directory not found: {root}")
    pairs = []
    for image in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        key, caption_file = image.stem, image.with_suffix(".txt")
        reason = None
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
            reason = None if caption else "empty caption"
        except FileNotFoundError:
            reason = "missing caption file"
        except UnicodeDecodeError:
            reason = "caption is not UTF-8"
        if reason:
            report.append({"key": key, "source": image.name, "action": "skipped", "reason": reason})
        else:
            pairs.append((key, str(image), caption))
    return pairs


def is_image_shards(spec: str) -> bool:
    path = Path(spec)
    return not path.is_dir() or (path / MANIFEST).is_file()


def plan_tasks(opts: CacheOptions, report: list[dict]) -> tuple[list[dict], dict, list[tuple[int, int]]]:
    """(tasks, description of the input for the manifest, buckets)."""
    if opts.prompts_only:
        buckets = buckets_or_default(opts.buckets)
        tasks, info = plan_prompt_tasks(
            opts.input_dir, opts.shard_size, buckets, report, opts.caption_columns, opts.input_manifest
        )
        return tasks, info, buckets
    if is_image_shards(opts.input_dir):
        shards = resolve_shards(opts.input_dir, opts.input_manifest)
        if shards.manifest.kind != "image-shards":
            raise InputError(f"{opts.input_dir}: not image shards (manifest kind {shards.manifest.kind!r})")
        buckets = opts.buckets or [tuple(b) for b in shards.manifest.producer["buckets"]]
        tasks = [{"name": f"features-{i:06d}.tar", "source": url} for i, url in enumerate(shards.urls)]
        digest = shards.digest() + shards.manifest.producer.get("listing_sha256", "")
        return tasks, {"kind": "image-shards", "shards": len(tasks), "sha256": digest}, buckets
    pairs = find_pairs(opts.input_dir, report)
    tasks = [
        {"name": f"features-{i:06d}.tar", "pairs": pairs[s : s + opts.shard_size]}
        for i, s in enumerate(range(0, len(pairs), opts.shard_size))
    ]
    digest = hashlib.sha256(json.dumps([(k, Path(p).name, c) for k, p, c in pairs]).encode()).hexdigest()
    return tasks, {"kind": "folder", "pairs": len(pairs), "sha256": digest}, buckets_or_default(opts.buckets)


def default_val_prompts(opts: CacheOptions, tasks: list[dict]) -> list[str]:
    if opts.val_prompts:
        return list(opts.val_prompts)
    if opts.prompts_only:
        return [captions[0] for task in tasks for _, captions, _ in task["prompts"]][:8]
    return list(DEFAULT_VAL_PROMPTS)


def buckets_or_default(buckets: list) -> list[tuple[int, int]]:
    return [tuple(b) for b in buckets] or [(1024, 1024)]


def resolve_model(opts: CacheOptions) -> dict:
    """`auto` model name and teacher context resolved from the pipeline directory."""
    from dopsd_scale.models import detect_spec_name, get_spec

    name = detect_spec_name(opts.pipeline) if opts.model_name == "auto" else opts.model_name
    context = opts.teacher_context
    if opts.prompts_only:
        if context not in ("auto", "prompt"):
            raise InputError(f"--prompts-only caches anchor prompts with the 'prompt' context, not {context!r}")
        context = "prompt"
    elif context == "auto":
        context = get_spec(name, opts.pipeline).default_context
    out = {"model_name": name, "teacher_context": context}
    if opts.prompts_only:
        out["latents"] = False  # prompt-only samples have no target image
    return out


# ---- the driver -----------------------------------------------------------------------------------
def _journal(out: Path, finished: set[str]) -> list[dict]:
    path = out / JOURNAL
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("shard") in finished]


def cache_features(opts: CacheOptions) -> dict:
    """Run the tool; returns a summary (also written to `summary.json`)."""
    t0 = time.perf_counter()
    out = Path(opts.output_dir)
    listing_report: list[dict] = []
    tasks, input_info, buckets = plan_tasks(opts, listing_report)
    worker_opts = {**asdict(opts), "buckets": [list(b) for b in buckets], **resolve_model(opts)}
    context_class(worker_opts["teacher_context"]).check_options(worker_opts)  # before any model loads
    pool = make_pool(
        ShardEncoder, worker_opts, opts.actors, opts.ray_address, opts.retries, noun="shard", object_store_mb=512
    )
    try:
        producer = {**pool.first("producer"), "input": input_info}
        manifest = check_or_create_manifest(out, producer)
        todo = [t for t in tasks if t["name"] not in manifest.shards]
        bar = tqdm(total=len(todo), desc="cache-features", unit="shard")
        sources = {t["name"]: t.get("source") for t in tasks}
        written, encode_seconds = 0, 0.0

        def finish(result: dict) -> None:
            nonlocal written, encode_seconds
            with open(out / JOURNAL, "a", encoding="utf-8") as f:  # the journal first: the manifest marks done
                for row in result["rows"]:
                    f.write(json.dumps({"shard": result["name"], **row}, ensure_ascii=False) + "\n")
            manifest.shards[result["name"]] = result["count"]
            if sources[result["name"]]:
                manifest.sources[result["name"]] = shard_name(sources[result["name"]])
            manifest.save(out)
            written += result["count"]
            encode_seconds += result["seconds"]
            bar.update(1)
            bar.set_postfix(samples=written, rate=f"{written / (time.perf_counter() - t0):.1f}/s")

        failed = pool.run(todo, finish)
        bar.close()
        if not (out / VAL_PROMPTS).is_file() or todo:
            pool.first("write_val_prompts", str(out / VAL_PROMPTS), default_val_prompts(opts, tasks))
    finally:
        pool.close()
    return _summarize(
        out,
        opts,
        manifest,
        listing_report,
        failed,
        len(tasks) - len(todo),
        written,
        time.perf_counter() - t0,
        encode_seconds,
    )


def _summarize(
    out: Path,
    opts: CacheOptions,
    manifest: Manifest,
    listing_report: list[dict],
    failed: list[dict],
    resumed: int,
    written: int,
    seconds: float,
    encode_seconds: float,
) -> dict:
    report = listing_report + [
        {k: v for k, v in r.items() if k != "shard"} for r in _journal(out, set(manifest.shards))
    ]
    report += [
        {
            "key": "*",
            "source": t.get("source") or t["name"],
            "action": "failed",
            "reason": f"shard failed after {t['tries']} tries ({t['error']})",
        }
        for t in failed
    ]
    write_report(out, report)
    counts = reason_counts(report)
    summary = {
        "samples_written": written,
        "shards_resumed": resumed,
        "shards_failed": [t["name"] for t in failed],
        "skipped": sum(1 for r in report if r["action"] == "skipped"),
        "total_samples": manifest.num_samples,
        "shards": len(manifest.shards),
        "reasons": counts,
        "seconds": round(seconds, 2),
        "samples_per_s": round(written / seconds, 2) if seconds > 0 else 0.0,
        "encode_samples_per_s": round(written / encode_seconds, 2) if encode_seconds > 0 else 0.0,
        "options": asdict(opts),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    log.info("cache-features: %s", format_counts(counts))
    return summary
