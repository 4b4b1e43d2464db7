"""What the data tools share: the manifest guard, the report file, the exit summary.

Both tools write into an output directory that records what produced it (`manifest.json`) and
which shards are finished (the manifest's `shards`, saved atomically after each one). A rerun
with the same inputs and settings resumes; one with different inputs or settings is refused,
naming the fields that differ, so two datasets never mix in one directory.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from dopsd_scale.data.format import MANIFEST, REPORT, Manifest

TOOL_VERSION = "0.2.0"


class InputError(ValueError):
    """Input the tool cannot use at all (a malformed manifest file, a missing column); one line
    naming the file and where."""


class ManifestMismatch(RuntimeError):
    """The output directory holds shards produced from other inputs or settings."""


def check_or_create_manifest(out: Path, producer: dict) -> Manifest:
    """The directory's manifest when `producer` matches it, a new one when there is none."""
    if (out / MANIFEST).is_file():
        existing = Manifest.load(out)
        if existing.producer != producer:
            diff = sorted(
                k for k in set(existing.producer) | set(producer) if existing.producer.get(k) != producer.get(k)
            )
            raise ManifestMismatch(
                f"{out / MANIFEST}: the shards here were produced differently (differs in: {', '.join(diff)}); "
                "use another output directory, or delete this one to start over"
            )
        return existing
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(producer=producer)
    manifest.save(out)
    return manifest


def write_report(out: Path, rows: Iterable[dict]) -> Path:
    """Write `report.jsonl` (one row per skipped or converted input: key, action, reason)."""
    path = out / REPORT
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_report(out: Path) -> list[dict]:
    path = out / REPORT
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reason_counts(rows: Iterable[dict]) -> dict[str, dict[str, int]]:
    """{action: {reason kind: count}}; the kind is the reason up to its first ':' or '('."""
    counts: dict[str, Counter] = {}
    for row in rows:
        kind = row["reason"].split(":")[0].split("(")[0].strip()
        counts.setdefault(row.get("action", "skipped"), Counter())[kind] += 1
    return {action: dict(sorted(c.items())) for action, c in sorted(counts.items())}


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    if not counts:
        return "none"
    return "; ".join(
        f"{action} {sum(c.values())} ({', '.join(f'{k}: {n}' for k, n in c.items())})" for action, c in counts.items()
    )
