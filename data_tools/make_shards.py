"""`dopsd make-shards`: raw image-text pairs -> WebDataset image shards.

Per sample the shard holds `<key>.<jpg|png|webp>` (the original bytes) and `<key>.json`
(`captions` with their `caption_fields`, `source_id`, `width`, `height`, `sha256`, `bucket`
[H, W], `mode`, `conversions`). Keys are the input's index in the listing (see `sources.py`).

How it stays exact at scale:
  - the listing is cut into shards up front (at most `shard_size` inputs and about
    `shard_bytes` bytes each), so shard i always holds the same inputs, whichever process
    writes it and whenever; processes write whole shards (`.tar.tmp`, then renamed) and the
    driver alone records finished shards in the manifest and in `journal.jsonl` (each finished
    shard's keys, hashes, buckets and report rows); a rerun resumes at the unfinished shards;
  - exact duplicates (same sha256 of the image bytes) are removed after all shards exist: the
    first occurrence in listing order stays, the shards holding later ones are rewritten
    without them (a rare, byte-copying pass) and the journal says so;
  - every skipped, converted or removed input is in `report.jsonl` with its key and reason,
    and the summary counts them; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import webdataset as wds
from tqdm import tqdm

from .common import TOOL_VERSION, check_or_create_manifest, format_counts, reason_counts, write_report
from .images import ImageRejected, assign_bucket, make_buckets, probe_image
from .sources import InputRecord, list_inputs, read_image_bytes

log = logging.getLogger(__name__)
JOURNAL = "journal.jsonl"


@dataclass
class ShardOptions:
    input: str
    """Folder of pairs, manifest file, imagefolder or `save_to_disk` dataset (see sources.py)."""
    output_dir: str
    shard_size: int = 1000
    """At most this many inputs per shard."""
    shard_bytes: int = 1 << 30
    """And about this many image bytes per shard (a shard closes before it would exceed it)."""
    buckets: list[tuple[int, int]] = field(default_factory=make_buckets)
    """(H, W) aspect buckets; each image gets the one closest in aspect ratio."""
    min_side: int = 256
    """Images whose shorter side is below this are skipped."""
    max_aspect: float = 4.0
    """Images more elongated than this (W:H or H:W) are skipped; 0 keeps all."""
    processes: int = 0
    """Writer processes; 0 = one per CPU core; 1 = in this process."""
    caption_columns: Optional[list[str]] = None
    image_column: Optional[str] = None
    reference_columns: Optional[list[str]] = None
    """Table columns naming extra reference images of a sample (stored as `ref_<i>` members)."""
    split: str = "train"


def plan_shards(records: list[InputRecord], shard_size: int, shard_bytes: int) -> list[list[InputRecord]]:
    """Cut the listing into shards by count and bytes (deterministic: it fixes shard contents)."""
    chunks: list[list[InputRecord]] = []
    current: list[InputRecord] = []
    size = 0
    for r in records:
        if current and (len(current) >= shard_size or size + r.size > shard_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(r)
        size += r.size
    if current:
        chunks.append(current)
    return chunks


def shard_name(index: int) -> str:
    return f"images-{index:06d}.tar"


# ---- one shard (runs in a writer process) ---------------------------------------------------------
def write_shard(out: str, name: str, records: list[dict], opts: dict) -> dict:
    """Write one image shard; returns its journal rows (accepted samples and report rows)."""
    rows: list[dict] = []
    tables: dict = {}
    tmp = Path(out) / (name + ".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for rec in map(lambda d: InputRecord(**d), records):
            try:
                data = read_image_bytes(rec, tables)
                info = probe_image(data, opts["min_side"], opts["max_aspect"])
            except ImageRejected as err:
                rows.append({"key": rec.key, "source": rec.source_id, "action": "skipped", "reason": str(err)})
                continue
            except Exception as err:  # a vanished file, a bad dataset row: this input only
                rows.append(
                    {
                        "key": rec.key,
                        "source": rec.source_id,
                        "action": "skipped",
                        "reason": f"unreadable input ({type(err).__name__}: {err})",
                    }
                )
                continue
            bucket = assign_bucket(info.width, info.height, [tuple(b) for b in opts["buckets"]])
            sha = hashlib.sha256(info.data).hexdigest()
            meta = {
                "captions": rec.captions,
                "caption_fields": rec.fields,
                "source_id": rec.source_id,
                "width": info.width,
                "height": info.height,
                "sha256": sha,
                "bytes": len(info.data),
                "mode": info.mode,
                "bucket": list(bucket),
                "conversions": info.conversions,
            }
            members = {"__key__": rec.key, info.ext: info.data}
            members.update(_reference_members(rec, opts, rows))
            meta["references"] = sum(1 for m in members if m.startswith("ref_"))
            members["json"] = json.dumps(meta, ensure_ascii=False).encode()
            sink.write(members)
            rows.append({"key": rec.key, "source": rec.source_id, "sha256": sha, "bucket": list(bucket)})
            rows.extend(
                {"key": rec.key, "source": rec.source_id, "action": "converted", "reason": c} for c in info.conversions
            )
    tmp.replace(Path(out) / name)
    return {"name": name, "rows": rows}


def _reference_members(rec: InputRecord, opts: dict, rows: list[dict]) -> dict[str, bytes]:
    """`ref_<i>.<ext>` members of a sample's usable reference images (a bad one is reported)."""
    members = {}
    for path in rec.references:
        try:
            info = probe_image(Path(path).read_bytes(), opts["min_side"], opts["max_aspect"])
        except (ImageRejected, OSError) as err:
            rows.append({"key": rec.key, "source": path, "action": "reference dropped", "reason": str(err)})
            continue
        members[f"ref_{len(members)}.{info.ext}"] = info.data
    return members


# ---- the driver -------------------------------------------------------------------------------------
def _producer(opts: ShardOptions, listing) -> dict:
    h = hashlib.sha256()
    for r in listing.records:
        h.update(json.dumps([r.index, r.source_id, r.captions, r.size, r.references], ensure_ascii=False).encode())
    return {
        "kind": "image-shards",
        "tool_version": TOOL_VERSION,
        "layout": listing.layout,
        "input": Path(opts.input).resolve().name,
        "inputs_listed": len(listing.records) + len(listing.rejected),
        "listing_sha256": h.hexdigest(),
        "buckets": [list(b) for b in opts.buckets],
        "min_side": opts.min_side,
        "max_aspect": opts.max_aspect,
        "shard_size": opts.shard_size,
        "shard_bytes": opts.shard_bytes,
        "reference_columns": list(opts.reference_columns or []),
    }


def _read_journal(out: Path, finished: set[str]) -> list[dict]:
    path = out / JOURNAL
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["shard"] in finished]


def _append_journal(out: Path, name: str, rows: list[dict]) -> None:
    with open(out / JOURNAL, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"shard": name, **row}, ensure_ascii=False) + "\n")


def _accepted(journal: list[dict]) -> dict[str, dict]:
    """key -> accepted row, minus the keys a later row removed (dedup)."""
    kept: dict[str, dict] = {}
    for row in journal:
        if "sha256" in row:
            kept[row["key"]] = row
        elif row.get("action") == "skipped":
            kept.pop(row["key"], None)
    return kept


def remove_from_shard(path: Path, keys: set[str]) -> int:
    """Rewrite a tar without the members of `keys` (bytes copied, nothing decoded); returns kept samples."""
    tmp = path.with_name(path.name + ".tmp")
    kept: set[str] = set()
    with tarfile.open(path) as src, tarfile.open(tmp, "w") as dst:
        for member in src:
            key = member.name.split("/")[-1].split(".", 1)[0]
            if key in keys:
                continue
            kept.add(key)
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    tmp.replace(path)
    return len(kept)


def deduplicate(out: Path, manifest, journal: list[dict]) -> list[dict]:
    """Remove later exact duplicates; returns the journal rows saying so."""
    first: dict[str, str] = {}
    removals: dict[str, dict[str, str]] = {}
    kept = _accepted(journal)
    for key, row in sorted(kept.items()):
        if row["sha256"] in first:
            removals.setdefault(row["shard"], {})[key] = first[row["sha256"]]
        else:
            first[row["sha256"]] = key
    new_rows = []
    for shard, dupes in sorted(removals.items()):
        manifest.shards[shard] = remove_from_shard(out / shard, set(dupes))
        rows = [
            {
                "key": k,
                "source": kept[k].get("source", "?"),
                "action": "skipped",
                "reason": f"duplicate (same sha256 as {orig})",
            }
            for k, orig in sorted(dupes.items())
        ]
        _append_journal(out, shard, rows)
        new_rows += [{"shard": shard, **r} for r in rows]
        manifest.save(out)
    return new_rows


def make_shards(opts: ShardOptions) -> dict:
    """Run the tool; returns the summary (also written to `summary.json`)."""
    t0 = time.perf_counter()
    out = Path(opts.output_dir)
    listing = list_inputs(opts.input, opts.caption_columns, opts.image_column, opts.split, opts.reference_columns)
    manifest = check_or_create_manifest(out, _producer(opts, listing))
    chunks = plan_shards(listing.records, opts.shard_size, opts.shard_bytes)
    todo = [(shard_name(i), c) for i, c in enumerate(chunks) if shard_name(i) not in manifest.shards]
    worker_opts = {"min_side": opts.min_side, "max_aspect": opts.max_aspect, "buckets": [list(b) for b in opts.buckets]}
    processes = opts.processes or os.cpu_count() or 1
    bar = tqdm(total=sum(len(c) for _, c in todo), desc="make-shards", unit="img")

    def finish(result: dict) -> None:
        _append_journal(out, result["name"], result["rows"])  # the journal first: the manifest marks done
        manifest.shards[result["name"]] = sum(1 for r in result["rows"] if "sha256" in r)
        manifest.save(out)
        bar.update(len(chunk_of[result["name"]]))

    chunk_of = dict(todo)
    if processes <= 1 or len(todo) <= 1:
        for name, chunk in todo:
            finish(write_shard(str(out), name, [asdict(r) for r in chunk], worker_opts))
    else:
        with ProcessPoolExecutor(max_workers=min(processes, len(todo))) as pool:
            queue, running = list(reversed(todo)), set()
            while queue or running:
                while queue and len(running) < 2 * processes:  # bounded: the listing may be huge
                    name, chunk = queue.pop()
                    running.add(pool.submit(write_shard, str(out), name, [asdict(r) for r in chunk], worker_opts))
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    finish(fut.result())
    bar.close()
    journal = _read_journal(out, set(manifest.shards))
    journal += deduplicate(out, manifest, journal)
    return _summarize(out, opts, listing, manifest, journal, len(chunks) - len(todo), time.perf_counter() - t0)


def _summarize(
    out: Path, opts: ShardOptions, listing, manifest, journal: list[dict], resumed: int, seconds: float
) -> dict:
    report = listing.rejected + [{k: v for k, v in r.items() if k != "shard"} for r in journal if "action" in r]
    report.sort(key=lambda r: r["key"])
    write_report(out, report)
    kept = _accepted(journal)
    counts = reason_counts(report)
    summary = {
        "inputs": len(listing.records) + len(listing.rejected),
        "layout": listing.layout,
        "samples": manifest.num_samples,
        "shards": len(manifest.shards),
        "shards_resumed": resumed,
        "skipped": sum(1 for r in report if r["action"] == "skipped"),
        "converted": len({r["key"] for r in report if r["action"] == "converted"}),
        "reasons": counts,
        "buckets": dict(sorted(Counter("x".join(map(str, r["bucket"])) for r in kept.values()).items())),
        "seconds": round(seconds, 2),
        "options": asdict(opts),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    log.info("make-shards: %s", format_counts(counts))
    return summary
