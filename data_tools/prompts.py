"""Prompt-only inputs for `cache-features --prompts-only`: the anchor sets of anchored D-OPSD.

An anchor set is a list of prompts the model already handles well (no images): a text file
(one prompt per line), a JSONL/CSV/Parquet table (the caption column, or `--caption-columns`),
or the captions of any image input `make-shards` reads (image shards, a folder of pairs; the
images are not opened). Each prompt becomes one sample whose teacher context is its own prompt
features (the `prompt` context); its bucket cycles through the bucket list, so anchor roll-outs
cover every resolution the run trains at.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Optional

from dopsd_scale.data.format import MANIFEST

from .common import InputError
from .sources import CAPTION_COLUMNS

TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")


def _table_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as err:
                raise InputError(f"{path}: line {n}: not a JSON object ({err})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {n}: not a JSON object")
            rows.append(row)
    return rows


def _from_table(path: Path, columns: Optional[list[str]]) -> list[list[str]]:
    rows = _table_rows(path)
    names = columns or [next((c for c in CAPTION_COLUMNS if rows and c in rows[0]), CAPTION_COLUMNS[0])]
    missing = [c for c in names if rows and c not in rows[0]]
    if missing:
        raise InputError(f"{path}: no caption column {missing[0]!r}")
    return [[str(row[c]).strip() for c in names if row.get(c) and str(row[c]).strip()] for row in rows]


def _from_image_shards(spec: str, manifest: Optional[str]) -> list[list[str]]:
    from dopsd_scale.data.shards import iter_tar_samples, resolve_shards

    def on_error(err: Exception) -> None:
        raise InputError(f"{spec}: unreadable tar data ({err})")

    out = []
    for url in resolve_shards(spec, manifest).urls:
        for raw in iter_tar_samples(url, on_error):
            meta = json.loads(raw["json"]) if "json" in raw else {}
            out.append([c.strip() for c in meta.get("captions", []) if isinstance(c, str) and c.strip()])
    return out


def _from_pairs(root: Path) -> list[list[str]]:
    files = sorted(p for p in root.glob("*.txt") if p.stem.count(".") == 0)
    return [[p.read_text(encoding="utf-8").strip()] for p in files]


def read_prompts(spec: str, columns: Optional[list[str]] = None, manifest: Optional[str] = None) -> list[list[str]]:
    """Caption variants per prompt-only sample (empty lists mark rows without a caption)."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".txt":
        return [[line.strip()] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.is_file() and path.suffix in TABLE_SUFFIXES:
        return _from_table(path, columns)
    if path.is_dir() and not (path / MANIFEST).is_file():
        return _from_pairs(path)
    if path.is_file():
        raise InputError(f"{path}: prompts come from a .txt, .jsonl, .csv or .parquet file, or image shards")
    return _from_image_shards(spec, manifest)


def plan_prompt_tasks(
    spec: str,
    shard_size: int,
    buckets: list[tuple[int, int]],
    report: list[dict],
    columns: Optional[list[str]] = None,
    manifest: Optional[str] = None,
) -> tuple[list[dict], dict]:
    """(tasks of `shard_size` prompts each, description of the input for the manifest)."""
    samples = []
    for i, captions in enumerate(read_prompts(spec, columns, manifest)):
        key = f"{i:09d}"
        if not captions:
            report.append({"key": key, "source": spec, "action": "skipped", "reason": "missing caption"})
            continue
        samples.append([key, captions, list(buckets[i % len(buckets)])])
    tasks = [
        {"name": f"features-{i:06d}.tar", "prompts": samples[s : s + shard_size]}
        for i, s in enumerate(range(0, len(samples), shard_size))
    ]
    digest = hashlib.sha256(json.dumps(samples).encode("utf-8")).hexdigest()
    return tasks, {"kind": "prompts", "prompts": len(samples), "sha256": digest}
