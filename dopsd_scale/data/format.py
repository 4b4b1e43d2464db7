"""The feature-sample format: WebDataset tar shards plus a manifest, no pickle anywhere.

One sample is two tar members sharing a key:
  `<key>.json`         metadata: caption, bucket [H, W] in pixels, source size, feature lengths
  `<key>.safetensors`  tensors: `student` [Ls, D], `teacher` [Lt, D], optional `latents` [C, h, w]
                       and `ref_latents` [C, h, w] (edit_reference context)
`manifest.json` beside the shards records what produced them; `val_prompts.safetensors` holds
the validation prompts' student features, so the trainer never loads an encoder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VAL_PROMPTS = "val_prompts.safetensors"
TENSOR_KEYS = ("student", "teacher", "latents", "ref_latents")
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


def decode_sample(raw: dict[str, Any]) -> FeatureSample:
    """Parse the raw tar members of one sample; raises FeatureFormatError naming the key."""
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')}:{key}"
    if "json" not in raw or "safetensors" not in raw:
        missing = [m for m in ("json", "safetensors") if m not in raw]
        raise FeatureFormatError(f"{where}: missing member(s) {', '.join(missing)}")
    try:
        meta = json.loads(raw["json"])
        tensors = st_load(bytes(raw["safetensors"]))
    except Exception as err:  # corrupt bytes fail in many ways
        raise FeatureFormatError(f"{where}: unreadable sample ({type(err).__name__}: {err})") from None
    for name in ("student", "teacher"):
        if name not in tensors or tensors[name].ndim != 2:
            raise FeatureFormatError(f"{where}: '{name}' features missing or not [L, D]")
    if "bucket" not in meta:
        raise FeatureFormatError(f"{where}: metadata has no 'bucket'")
    return FeatureSample(key=key, meta=meta, tensors=tensors)


# ---- manifest -------------------------------------------------------------------------------
@dataclass
class Manifest:
    """What produced a directory of feature shards; caching refuses to mix two of them."""

    producer: dict[str, Any]
    shards: dict[str, int] = field(default_factory=dict)  # shard file name -> sample count
    format_version: int = FORMAT_VERSION

    @property
    def feature_dim(self) -> int:
        return int(self.producer["feature_dim"])

    @property
    def num_samples(self) -> int:
        return sum(self.shards.values())

    def to_json(self) -> dict:
        return {"format_version": self.format_version, "producer": self.producer, "shards": self.shards}

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(path)  # atomic: a reader never sees half a manifest

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise FeatureFormatError(f"{path}: no manifest (is this a feature-shard directory?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(producer=data["producer"], shards=data["shards"], format_version=data["format_version"])
        except (json.JSONDecodeError, KeyError) as err:
            raise FeatureFormatError(f"{path}: malformed manifest ({err})") from None


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
    if explicit:
        return Path(explicit)
    candidate = Path(data_dir) / VAL_PROMPTS if data_dir else None
    return candidate if candidate is not None and candidate.is_file() else None

