"""The feature-sample format: WebDataset tar shards plus a manifest, no pickle anywhere.

One sample is two tar members sharing a key:
  `<key>.json`         metadata: `caption` (variant 0), `captions` (all variants), bucket [H, W]
                       in pixels, source size and id, the tensors' shapes
  `<key>.safetensors`  tensors: `student` [Ls, D], `teacher` [Lt, D], optional `latents` [C, h, w]
                       and `ref_latents` [C, h, w] (edit_reference context)

Caption variants (e.g. a long caption and a tag list of the same image) live in ONE sample:
variant 0 is `student`/`teacher`, variant i >= 1 is `student_<i>`/`teacher_<i>` (both depend on
the caption; the latents do not, so they are stored once). One sample per image keeps an epoch
"every image once" whatever the number of variants; the reader picks one variant per sample and
epoch with :func:`pick_variant`, a hash of (seed, epoch, key), so the choice is reproducible and
a resumed run picks the same ones. A sample without variants is simply a one-variant sample.

`manifest.json` beside the shards records what produced them; `val_prompts.safetensors` holds
the validation prompts' student features, so the trainer never loads an encoder. Image shards
(from `make-shards`) use the same `Manifest` class with `producer["kind"] == "image-shards"`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.jsonl"
VAL_PROMPTS = "val_prompts.safetensors"
TENSOR_KEYS = ("student", "teacher", "latents", "ref_latents")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Tar member extensions of the image in an image shard (the original bytes, never re-encoded)."""
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class FeatureFormatError(ValueError):
    """A sample or file that does not follow the feature format; the message names it."""


@dataclass
class FeatureSample:
    key: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def bucket(self) -> tuple[int, int]:
        h, w = self.meta["bucket"]
        return int(h), int(w)

    @property
    def num_variants(self) -> int:
        return count_variants(self.tensors)

    def variant(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) features of caption variant `index`."""
        return self.tensors[variant_name("student", index)], self.tensors[variant_name("teacher", index)]


def variant_name(base: str, index: int) -> str:
    """Tensor name of caption variant `index`: `student`, `student_1`, `student_2`, ..."""
    return base if index == 0 else f"{base}_{index}"


def count_variants(names) -> int:
    """Number of consecutive caption variants present among tensor `names`."""
    n = 0
    while variant_name("student", n) in names and variant_name("teacher", n) in names:
        n += 1
    return n


def pick_variant(seed: int, epoch: int, key: str, count: int) -> int:
    """The caption variant a sample shows in an epoch: stable across runs, processes and layouts."""
    if count <= 1:
        return 0
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count  # (not crc32: linear, its parity ignores the epoch)


def encode_sample(sample: FeatureSample, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """A dict for `webdataset.TarWriter.write` (members `json` and `safetensors`)."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sample.tensors.items()}
    meta = dict(sample.meta)
    meta.update({f"{k}_shape": list(v.shape) for k, v in tensors.items()})
    return {
        "__key__": sample.key,
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        "safetensors": st_save(tensors),
    }


def _parse_members(raw: dict[str, Any], read: Callable[[bytes], Any]) -> tuple[str, dict, Any]:
    """(where, metadata, read(safetensors bytes)) of one sample's raw tar members."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    missing = [m for m in ("json", "safetensors") if m not in raw]
    if missing:
        raise FeatureFormatError(f"{where}: missing member(s) {', '.join(missing)}")
    try:
        blob = raw["safetensors"]  # bytes, or a member of a local tar read on demand (shards.TarMember)
        return where, json.loads(raw["json"]), read(bytes(blob) if isinstance(blob, (bytearray, memoryview)) else blob)
    except Exception as err:  # corrupt bytes fail in many ways
        raise FeatureFormatError(f"{where}: unreadable sample ({type(err).__name__}: {err})") from None


def decode_sample(raw: dict[str, Any]) -> FeatureSample:
    """Parse the raw tar members of one sample; raises FeatureFormatError naming the key."""
    where, meta, tensors = _parse_members(raw, st_load)
    check_feature_shapes(where, meta, {name: list(t.shape) for name, t in tensors.items()})
    return FeatureSample(key=raw.get("__key__", "?"), meta=meta, tensors=tensors)


def check_raw_sample(raw: dict[str, Any], width: Optional[int] = None) -> tuple[dict, dict[str, list[int]]]:
    """(metadata, tensor shapes) of raw tar members, checked without decoding the tensors."""
    meta, tensors = check_stored_sample(raw, width)
    return meta, {name: list(t.shape) for name, t in tensors.items()}


def check_stored_sample(raw: dict[str, Any], width: Optional[int] = None) -> tuple[dict, dict[str, StoredTensor]]:
    """(metadata, tensors located but not read) of raw tar members, checked from the header alone."""
    where, meta, tensors = _parse_members(raw, stored_tensors)
    check_feature_shapes(where, meta, {name: list(t.shape) for name, t in tensors.items()}, width)
    return meta, tensors


def check_feature_shapes(where: str, meta: dict, shapes: dict[str, list[int]], width: Optional[int] = None) -> None:
    """Structural checks of one sample (and its feature width when given); names the field."""
    if "bucket" not in meta:
        raise FeatureFormatError(f"{where}: metadata has no 'bucket'")
    count = count_variants(shapes)
    if count == 0:
        raise FeatureFormatError(f"{where}: 'student' or 'teacher' features missing")
    for i in range(count):
        for base in ("student", "teacher"):
            name = variant_name(base, i)
            if len(shapes[name]) != 2:
                raise FeatureFormatError(f"{where}: '{name}' features are not [L, D] (shape {shapes[name]})")
            if width is not None and shapes[name][1] != width:
                raise FeatureFormatError(f"{where}: '{name}' width {shapes[name][1]}, the model expects {width}")


ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype names the reader can place in a batch."""


def safetensors_header(blob) -> tuple[int, dict[str, dict]]:
    """(offset of the data, header entries) of a safetensors blob, checked without reading the data.

    `blob` is bytes or anything sliceable with a length (a `shards.TarMember` reads only the
    header). The reader checks every sample this way before batching (a bad sample never breaks
    a batch: dtypes, shapes and byte ranges must agree) and reads only the samples it yields, so
    replaying a stream on resume is cheap.
    """
    if len(blob) < 8:
        raise ValueError("shorter than a safetensors header")
    head = blob[: min(len(blob), 1 << 12)]  # one read covers most headers
    (n,) = struct.unpack("<Q", head[:8])
    if n > len(blob) - 8:
        raise ValueError(f"header length {n} exceeds the blob ({len(blob)} bytes)")
    header = json.loads(head[8 : 8 + n] if 8 + n <= len(head) else blob[8 : 8 + n])
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end != len(blob):
        raise ValueError(f"data ends at {8 + n + end}, blob has {len(blob)} bytes (truncated?)")
    for name, v in header.items():
        _check_entry(name, v)
    return 8 + n, header


def _check_entry(name: str, entry: dict) -> None:
    """A header entry whose dtype is known and whose byte range holds exactly its shape."""
    if entry.get("dtype") not in ST_DTYPES:
        raise ValueError(f"tensor {name!r}: unsupported dtype {entry.get('dtype')!r}")
    lo, hi = (int(o) for o in entry["data_offsets"])
    count = 1
    for d in entry["shape"]:
        count *= int(d)
    if lo < 0 or hi - lo != count * ST_DTYPES[entry["dtype"]].itemsize:
        raise ValueError(f"tensor {name!r}: bytes {lo}..{hi} do not hold {entry['dtype']} {entry['shape']}")


def safetensors_shapes(blob) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors blob's header, without decoding the tensors."""
    return {name: [int(d) for d in v["shape"]] for name, v in safetensors_header(blob)[1].items()}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors blob, located by its header but not read.

    The reader keeps these in its shuffle buffer and copies each one straight into its row of
    the padded batch: one copy from the page cache (a local tar member) or from the bytes of a
    streamed one, with no intermediate tensor, and nothing read for what a batch does not use
    (the caption variants not shown this epoch).
    """

    blob: Any = field(repr=False)
    """bytes, or a `shards.TarMember` (has `readinto(buffer, start)`)."""
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def copy_into(self, dest: torch.Tensor) -> None:
        """Write the tensor into `dest` (same shape; cast when its dtype differs)."""
        if tuple(dest.shape) != self.shape:
            raise ValueError(f"a stored {list(self.shape)} tensor cannot fill a {list(dest.shape)} one")
        if dest.dtype == self.dtype and dest.is_contiguous():
            self._read(_byte_view(dest))
        else:
            dest.copy_(self.load())

    def load(self) -> torch.Tensor:
        """The tensor on its own (a copy of the bytes, in the stored dtype)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        self._read(_byte_view(out))
        return out

    def _read(self, view: numpy.ndarray) -> None:
        if hasattr(self.blob, "readinto"):
            self.blob.readinto(view, self.start)
        else:
            view[:] = numpy.frombuffer(self.blob, numpy.uint8, self.end - self.start, self.start)


def _byte_view(t: torch.Tensor) -> numpy.ndarray:
    """The bytes of a contiguous tensor, writable (numpy: no torch dispatch per copy)."""
    return t.view(-1).view(torch.uint8).numpy()


def stored_tensors(blob) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors blob, located (see `StoredTensor`)."""
    base, header = safetensors_header(blob)
    return {
        name: StoredTensor(
            blob,
            base + int(v["data_offsets"][0]),
            base + int(v["data_offsets"][1]),
            ST_DTYPES[v["dtype"]],
            tuple(int(d) for d in v["shape"]),
        )
        for name, v in header.items()
    }


# ---- manifest -------------------------------------------------------------------------------
@dataclass
class Manifest:
    """What produced a directory of feature shards; caching refuses to mix two of them."""

    producer: dict[str, Any]
    shards: dict[str, int] = field(default_factory=dict)  # shard file name -> sample count
    format_version: int = FORMAT_VERSION
    sources: dict[str, str] = field(default_factory=dict)  # feature shard -> the image shard it came from

    @property
    def feature_dim(self) -> int:
        return int(self.producer["feature_dim"])

    @property
    def num_samples(self) -> int:
        return sum(self.shards.values())

    @property
    def kind(self) -> str:
        return str(self.producer.get("kind", "features"))

    def to_json(self) -> dict:
        data = {"format_version": self.format_version, "producer": self.producer, "shards": self.shards}
        if self.sources:
            data["sources"] = self.sources
        return data

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(path)  # atomic: a reader never sees half a manifest

    @classmethod
    def load(cls, location: str | Path) -> Manifest:
        """From a shard directory, a manifest file, or a local glob/brace shard pattern."""
        path = manifest_path(location)
        if not path.is_file():
            raise FeatureFormatError(f"{path}: no manifest (is this a shard directory?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                producer=data["producer"],
                shards=data["shards"],
                format_version=data["format_version"],
                sources=data.get("sources", {}),
            )
        except (json.JSONDecodeError, KeyError) as err:
            raise FeatureFormatError(f"{path}: malformed manifest ({err})") from None


def manifest_path(location: str | Path) -> Path:
    """Where the manifest of `location` lives: in the directory, the file itself, or beside the
    first shard a local glob/brace pattern names (`pipe:` specs need an explicit manifest)."""
    text = str(location)
    if text.startswith("pipe:"):
        raise FeatureFormatError(f"{text}: a pipe: shard spec has no local manifest; give the manifest.json path")
    path = Path(text)
    if path.is_dir():
        return path / MANIFEST
    if path.suffix == ".json":
        return path
    if any(c in text for c in "*?[{"):
        from braceexpand import braceexpand

        for pattern in braceexpand(text):
            matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
            if matches:
                return Path(matches[0]).parent / MANIFEST
    return path / MANIFEST


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_model_dir(path: str | Path) -> dict[str, str]:
    """sha256 of a model directory's config files and weight files (by relative name)."""
    root = Path(path)
    names = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".txt"))
    return {str(p.relative_to(root)): sha256_file(p) for p in names}


# ---- validation prompts ---------------------------------------------------------------------
def save_val_prompts(path: str | Path, prompts: list[str], feats: list[torch.Tensor], dtype=torch.bfloat16) -> None:
    tensors = {f"prompt_{i}": f.to("cpu", dtype).contiguous() for i, f in enumerate(feats)}
    save_file(tensors, str(path), metadata={"prompts": json.dumps(prompts, ensure_ascii=False)})


def load_val_prompts(path: str | Path) -> tuple[list[str], list[torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        prompts = json.loads((f.metadata() or {}).get("prompts", "[]"))
    tensors = load_file(str(path))
    return prompts, [tensors[f"prompt_{i}"].float() for i in range(len(prompts))]


def find_val_prompts(data_dir: Optional[str], explicit: Optional[str]) -> Optional[Path]:
    """The explicit file, else `val_prompts.safetensors` beside the shards' manifest, if any."""
    if explicit:
        return Path(explicit)
    if not data_dir:
        return None
    try:
        candidate = manifest_path(data_dir).parent / VAL_PROMPTS
    except FeatureFormatError:  # a pipe: spec: only an explicit file can be used
        return None
    return candidate if candidate.is_file() else None
