"""Inputs of `make-shards`: list every image-text pair once, in a stable order, cheaply.

Layouts (detected from the path):
  folder      `<stem>.<png|jpg|jpeg|webp|bmp|tif|tiff|gif>` with `<stem>.txt` (field "caption") and
              optional variants `<stem>.<field>.txt` (e.g. `0001.tags.txt`), in any sub-folder;
  manifest    a `.jsonl`, `.csv` or `.parquet` file with an image-path column (relative to the
              manifest's folder) and one or more caption columns;
  imagefolder a folder with `metadata.jsonl|csv|parquet` files (Hugging Face "imagefolder": a
              `file_name` column relative to the metadata file's folder, caption columns);
  hf-disk     a Hugging Face dataset written by `save_to_disk` (`state.json` or, with splits,
              `dataset_dict.json`): an `Image` column and string columns, read with pyarrow.
Listing only reads captions and file sizes; images are read by the shard writers. Every input
gets an index (its sample key), also the ones rejected here, so reports and keys stay stable.
A rejected input (missing or non-UTF-8 caption, missing image file, malformed row) goes to the
report with its key and reason.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .common import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
IMAGE_COLUMNS = ("image", "file_name", "image_path", "path", "file")
CAPTION_COLUMNS = ("caption", "text", "prompt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def sample_key(index: int) -> str:
    """The WebDataset key of input `index`: digits only (a dot would split a key)."""
    return f"{index:09d}"


@dataclass
class InputRecord:
    """One listed pair; the image is a file (`path`) or a row of an Arrow file (`arrow`, `row`)."""

    index: int
    source_id: str
    captions: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    path: Optional[str] = None
    arrow: Optional[str] = None
    row: int = -1
    column: str = ""
    size: int = 0
    references: list[str] = field(default_factory=list)
    """Extra reference images of the sample (files; `--reference-columns` of a table), in order."""

    @property
    def key(self) -> str:
        return sample_key(self.index)


@dataclass
class Listing:
    records: list[InputRecord]
    rejected: list[dict]  # report rows
    layout: str


class _Lister:
    """Collects records and rejections while assigning indices in listing order."""

    def __init__(self, caption_columns: Optional[list[str]], reference_columns: Optional[list[str]] = None):
        self.records: list[InputRecord] = []
        self.rejected: list[dict] = []
        self.caption_columns = caption_columns
        self.reference_columns = reference_columns or []
        self.next_index = 0

    def reject(self, source_id: str, reason: str) -> None:
        self.rejected.append(
            {"key": sample_key(self.next_index), "source": source_id, "action": "skipped", "reason": reason}
        )
        self.next_index += 1

    def add(self, source_id: str, captions: dict[str, object], **where) -> None:
        """Keep the usable captions; a pair with none is rejected, a bad variant is noted."""
        good: dict[str, str] = {}
        problems = []
        for name, value in captions.items():
            text, problem = _clean_caption(value)
            if problem:
                problems.append(f"{problem} (field {name})")
            else:
                good[name] = text
        if not good:
            self.reject(source_id, "; ".join(problems) or "missing caption")
            return
        record = InputRecord(self.next_index, source_id, list(good.values()), list(good), **where)
        for p in problems:
            self.rejected.append({"key": record.key, "source": source_id, "action": "variant dropped", "reason": p})
        self.records.append(record)
        self.next_index += 1

    def caption_fields(self, columns: list[str], where: str) -> list[str]:
        if self.caption_columns:
            missing = [c for c in self.caption_columns if c not in columns]
            if missing:
                raise InputError(f"{where}: no caption column {missing[0]!r} (columns: {', '.join(columns)})")
            return list(self.caption_columns)
        found = [c for c in CAPTION_COLUMNS if c in columns][:1]
        if not found:
            raise InputError(
                f"{where}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}); "
                "name them with --caption-columns"
            )
        return found


def _clean_caption(value: object) -> tuple[str, Optional[str]]:
    if value is None:
        return "", "missing caption"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return "", "caption is not UTF-8"
    text = str(value)
    if any("\udc80" <= ch <= "\udcff" for ch in text):  # surrogate-escaped bytes
        return "", "caption is not UTF-8"
    text = text.strip()
    return (text, None) if text else ("", "empty caption")


# ---- folder of pairs ----------------------------------------------------------------------------
def _list_folder(root: Path, lister: _Lister) -> None:
    for directory, _, files in sorted(os.walk(root)):
        files = sorted(files)
        images = {f.rsplit(".", 1)[0]: f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES}
        captions: dict[str, dict[str, Path]] = {stem: {} for stem in images}
        for f in files:
            if not f.endswith(".txt"):
                continue
            base = f[:-4]
            if base in captions:
                captions[base]["caption"] = Path(directory, f)
                continue
            for i in range(len(base) - 1, 0, -1):  # `<stem>.<field>.txt`, stems may hold dots
                if base[i] == "." and base[:i] in captions:
                    captions[base[:i]][base[i + 1 :]] = Path(directory, f)
                    break
        for stem, name in sorted(images.items()):
            path = Path(directory, name)
            source = str(path.relative_to(root))
            files_of = captions[stem]
            if not files_of:
                lister.reject(source, "missing caption file")
                continue
            order = (["caption"] if "caption" in files_of else []) + sorted(k for k in files_of if k != "caption")
            lister.add(source, {k: files_of[k].read_bytes() for k in order}, path=str(path), size=path.stat().st_size)


# ---- tables: manifests and imagefolder metadata -------------------------------------------------
def _read_rows(path: Path) -> tuple[list[str], list[dict | str]]:
    """(columns, rows); a row that cannot be parsed is a string saying why."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return table.column_names, table.to_pylist()
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), [dict(r) for r in reader]
    rows: list[dict | str] = []
    columns: dict[str, None] = {}
    first_bad: Optional[str] = None
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not an object")
            columns.update(dict.fromkeys(row))
            rows.append(row)
        except UnicodeDecodeError:
            rows.append(f"caption is not UTF-8 (line {n})")
        except ValueError as err:
            rows.append(f"malformed manifest row (line {n}: {err})")
            first_bad = first_bad or f"line {n}: {err}"
    if not columns and first_bad:  # not one usable row: the file itself is not JSON Lines
        raise InputError(f"{path}: not a JSON Lines manifest (one JSON object per line); {first_bad}")
    return list(columns), rows


def _references(row: dict, columns: list[str], base: Path, key: str, lister: _Lister) -> list[str]:
    """The reference image files a row names (empty cells are fine; a missing file is reported)."""
    found = []
    for column in columns:
        rel = row.get(column)
        if not rel:
            continue
        ref = base / str(rel)
        if ref.is_file():
            found.append(str(ref))
        else:
            lister.rejected.append(
                {
                    "key": key,
                    "source": str(rel),
                    "action": "reference dropped",
                    "reason": f"reference image not found (column {column}): {ref}",
                }
            )
    return found


def _list_table(path: Path, lister: _Lister, image_column: Optional[str]) -> None:
    columns, rows = _read_rows(path)
    image_col = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_col is None or image_col not in columns:
        raise InputError(f"{path}: no image column (looked for {image_column or ', '.join(IMAGE_COLUMNS)})")
    fields = lister.caption_fields(columns, str(path))
    missing = [c for c in lister.reference_columns if c not in columns]
    if missing:
        raise InputError(f"{path}: no reference column {missing[0]!r} (columns: {', '.join(columns)})")
    for n, row in enumerate(rows):
        source = f"{path.name}:{n}"
        if isinstance(row, str):
            lister.reject(source, row)
            continue
        rel = row.get(image_col)
        image = path.parent / str(rel) if rel else None
        if image is None or not image.is_file():
            lister.reject(source, f"image file not found: {image}")
            continue
        refs = _references(row, lister.reference_columns, path.parent, sample_key(lister.next_index), lister)
        lister.add(
            str(rel), {c: row.get(c) for c in fields}, path=str(image), size=image.stat().st_size, references=refs
        )


def _list_imagefolder(root: Path, lister: _Lister, image_column: Optional[str]) -> None:
    listed: set[Path] = set()
    for meta in sorted(p for p in root.rglob("metadata.*") if p.name in METADATA_FILES):
        before = len(lister.records)
        _list_table(meta, lister, image_column or "file_name")
        listed.update(Path(r.path).resolve() for r in lister.records[before:])
    for directory, _, files in sorted(os.walk(root)):  # images no metadata row names
        for f in sorted(files):
            path = Path(directory, f)
            if path.suffix.lower() in IMAGE_SUFFIXES and path.resolve() not in listed:
                lister.reject(str(path.relative_to(root)), "missing caption (no metadata row)")


# ---- datasets saved with save_to_disk -------------------------------------------------------------
def _list_hf_disk(root: Path, lister: _Lister, split: str) -> None:
    if (root / "dataset_dict.json").is_file():
        root = root / split
        if not (root / "state.json").is_file():
            raise InputError(f"{root}: no split {split!r} in this DatasetDict")
    state = json.loads((root / "state.json").read_text(encoding="utf-8"))
    info = json.loads((root / "dataset_info.json").read_text(encoding="utf-8"))
    features = info.get("features", {})
    image_cols = [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
    if not image_cols:
        raise InputError(f"{root}: no column of type Image (columns: {', '.join(features)})")
    fields = lister.caption_fields(list(features), str(root))
    row = 0
    for data_file in state["_data_files"]:
        arrow = root / data_file["filename"]
        with pa.memory_map(str(arrow)) as source:
            table = pa.ipc.open_stream(source).read_all()
        images = table.column(image_cols[0]).to_pylist()
        texts = {c: table.column(c).to_pylist() for c in fields}
        for i, image in enumerate(images):
            source_id = (image or {}).get("path") or f"{root.name}:{row}"
            data = (image or {}).get("bytes")
            if data is None and not (image and image.get("path") and Path(image["path"]).is_file()):
                lister.reject(source_id, "image missing in the dataset row")
            else:
                lister.add(
                    source_id,
                    {c: texts[c][i] for c in fields},
                    arrow=str(arrow),
                    row=i,
                    column=image_cols[0],
                    size=len(data) if data else 0,
                )
            row += 1


def detect_layout(path: Path) -> str:
    if path.is_file():
        if path.suffix in (".jsonl", ".csv", ".parquet"):
            return "manifest"
        raise InputError(f"{path}: not a .jsonl, .csv or .parquet manifest")
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return "hf-disk"
    if any(p.name in METADATA_FILES for p in path.rglob("metadata.*")):
        return "imagefolder"
    return "folder"


def list_inputs(
    path: str | Path,
    caption_columns: Optional[list[str]] = None,
    image_column: Optional[str] = None,
    split: str = "train",
    reference_columns: Optional[list[str]] = None,
) -> Listing:
    """Every input pair of `path` (see the module docstring for the layouts)."""
    root = Path(path)
    layout = detect_layout(root)
    if reference_columns and layout not in ("manifest", "imagefolder"):
        raise InputError(f"{root}: --reference-columns needs a .jsonl/.csv/.parquet manifest or an imagefolder")
    lister = _Lister(caption_columns, reference_columns)
    if layout == "manifest":
        _list_table(root, lister, image_column)
    elif layout == "hf-disk":
        _list_hf_disk(root, lister, split)
    elif layout == "imagefolder":
        _list_imagefolder(root, lister, image_column)
    else:
        _list_folder(root, lister)
    return Listing(lister.records, lister.rejected, layout)


def read_image_bytes(record: InputRecord, tables: dict[str, pa.Table]) -> bytes:
    """The original bytes of a record's image (`tables` caches opened Arrow files)."""
    if record.path is not None:
        return Path(record.path).read_bytes()
    if record.arrow not in tables:
        source = pa.memory_map(record.arrow)
        tables[record.arrow] = pa.ipc.open_stream(source).read_all()
    cell = tables[record.arrow].column(record.column)[record.row].as_py()
    if cell.get("bytes") is not None:
        return cell["bytes"]
    return Path(cell["path"]).read_bytes()
