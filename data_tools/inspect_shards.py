"""`dopsd inspect` and `dopsd verify`: what shards hold, and whether they agree with each other.

inspect: per directory (image or feature shards, told apart by the manifest's kind) the sample
count per shard, the bucket histogram, caption-variant counts, and for feature shards the
length statistics of the student and teacher features (read from safetensors headers only).
verify: every shard's count matches its manifest, every sample is well-formed (features of the
manifest's width), and, given the image shards too, the keys line up: each feature shard holds
exactly the keys of the image shard it came from, minus the ones its `report.jsonl` names.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from dopsd_scale.data.format import IMAGE_EXTS, FeatureFormatError, check_raw_sample, count_variants
from dopsd_scale.data.shards import ShardSet, iter_tar_samples, resolve_shards, shard_name

from .common import read_report


@dataclass
class ShardScan:
    name: str
    keys: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    buckets: Counter = field(default_factory=Counter)
    variants: Counter = field(default_factory=Counter)
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"student": [], "teacher": []})
    nbytes: int = 0


def _raw_samples(url: str, bad: list) -> Iterator[dict]:
    def on_error(err: Exception) -> None:
        bad.append(("?", f"unreadable tar data, rest of the shard lost ({type(err).__name__}: {err})"))

    yield from iter_tar_samples(url, on_error)


def scan_shard(url: str, kind: str, width: Optional[int] = None) -> ShardScan:
    """Read one shard's members (features: headers only) and collect its statistics."""
    scan = ShardScan(shard_name(url))
    for raw in _raw_samples(url, scan.bad):
        key = raw["__key__"]
        scan.nbytes += sum(len(v) for k, v in raw.items() if isinstance(v, bytes))
        try:
            if kind == "image-shards":
                meta = json.loads(raw["json"])
                if not any(e in raw for e in IMAGE_EXTS):
                    raise ValueError("no image member")
                variants = len(meta.get("captions", []))
            else:
                meta, shapes = check_raw_sample(raw, width)
                variants = count_variants(shapes)
                for i in range(variants):
                    for base in ("student", "teacher"):
                        scan.lengths[base].append(shapes[base if i == 0 else f"{base}_{i}"][0])
        except (FeatureFormatError, ValueError, KeyError) as err:
            scan.bad.append((key, str(err)))
            continue
        scan.keys.append(key)
        scan.buckets["x".join(map(str, meta["bucket"]))] += 1
        scan.variants[variants] += 1
    return scan


def _stats(values: list[int]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 1),
        "p50": int(np.percentile(a, 50)),
        "p95": int(np.percentile(a, 95)),
        "max": int(a.max()),
    }


def inspect_shards(spec: str, manifest: Optional[str] = None, limit: Optional[int] = None) -> dict:
    """Counts, bucket histogram, variants and feature lengths of the shards of `spec`."""
    shards = resolve_shards(spec, manifest)
    kind = shards.manifest.kind
    width = shards.manifest.producer.get("feature_dim") if kind != "image-shards" else None
    scans = [scan_shard(u, kind, width) for u in shards.urls[:limit]]
    buckets, variants = Counter(), Counter()
    lengths: dict[str, list[int]] = {"student": [], "teacher": []}
    for s in scans:
        buckets.update(s.buckets)
        variants.update(s.variants)
        for k in lengths:
            lengths[k] += s.lengths[k]
    return {
        "kind": kind,
        "shards": len(shards.urls),
        "scanned": len(scans),
        "samples": sum(len(s.keys) for s in scans),
        "manifest_samples": shards.manifest.num_samples,
        "bad": sum(len(s.bad) for s in scans),
        "mbytes": round(sum(s.nbytes for s in scans) / 1e6, 3),
        "per_shard": {s.name: len(s.keys) for s in scans},
        "buckets": dict(sorted(buckets.items())),
        "caption_variants": {str(k): v for k, v in sorted(variants.items())},
        "lengths": {k: _stats(v) for k, v in lengths.items() if v},
    }


def verify_shards(
    features: str, images: Optional[str] = None, manifest: Optional[str] = None, images_manifest: Optional[str] = None
) -> list[str]:
    """Problems found (empty: all good); each names the shard and key."""
    feats = resolve_shards(features, manifest)
    problems: list[str] = []
    width = feats.manifest.producer.get("feature_dim")
    scans = {}
    for url in feats.urls:
        scan = scans[shard_name(url)] = scan_shard(url, feats.manifest.kind, width)
        problems += [f"{scan.name}:{key}: {reason}" for key, reason in scan.bad]
        expected = feats.manifest.shards.get(scan.name)
        if expected != len(scan.keys):
            problems.append(f"{scan.name}: {len(scan.keys)} good sample(s), the manifest says {expected}")
    if images:
        problems += _verify_alignment(feats, scans, resolve_shards(images, images_manifest), features)
    return problems


def _verify_alignment(feats: ShardSet, scans: dict[str, ShardScan], images: ShardSet, features_spec: str) -> list[str]:
    problems = []
    directory = feats.manifest_file.parent if feats.manifest_file else None
    reported = {r["key"] for r in read_report(directory)} if directory else set()
    image_urls = {shard_name(u): u for u in images.urls}
    cached = set(feats.manifest.sources.values())
    problems += [
        f"{name}: image shard not cached (no feature shard comes from it)" for name in image_urls if name not in cached
    ]
    for feature_shard, source in sorted(feats.manifest.sources.items()):
        if source not in image_urls:
            problems.append(f"{feature_shard}: its image shard {source} is not among the image shards")
            continue
        image_keys = set(scan_shard(image_urls[source], "image-shards").keys)
        feature_keys = set(scans[feature_shard].keys) if feature_shard in scans else set()
        problems += [f"{feature_shard}:{k}: not in its image shard {source}" for k in sorted(feature_keys - image_keys)]
        problems += [
            f"{source}:{k}: no features and no report row in {features_spec}"
            for k in sorted(image_keys - feature_keys - reported)
        ]
    return problems
