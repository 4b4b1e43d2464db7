"""Shard lists: which tar files a spec names, and the manifest that describes them.

A spec (the reader's `data.path`, the tools' inputs) is one of
  - a directory holding `manifest.json`: its shards, in manifest order;
  - a local glob, `feats/features-*.tar`, or brace pattern, `feats/features-{000000..000127}.tar`
    (both may be combined); the manifest is the one beside the first shard unless given;
  - a `pipe:` command per shard for object stores, brace-expanded,
    `pipe:aws s3 cp s3://bucket/feats/features-{000000..000127}.tar -`: the manifest must be
    given (a local copy of the small `manifest.json`), since nothing can be listed.
Every shard of a spec must be listed in its manifest: a stray tar from another run, or one
half-written by an interrupted caching job (those are named `*.tar.tmp`), is refused by name.
"""

from __future__ import annotations

import glob
import hashlib
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import webdataset as wds
from braceexpand import braceexpand

from .format import MANIFEST, FeatureFormatError, Manifest

_TAR_NAME = re.compile(r"([^/\s'\"]+\.tar)\b")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's rule: the key ends at the first dot


def shard_name(url: str) -> str:
    """The file name of a shard, also inside a `pipe:` command (the last `*.tar` it mentions)."""
    if url.startswith("pipe:"):
        names = _TAR_NAME.findall(url)
        if not names:
            raise FeatureFormatError(f"{url}: cannot tell which .tar file this pipe: command reads")
        return names[-1]
    return Path(url).name


def is_pattern(spec: str) -> bool:
    return spec.startswith("pipe:") or any(c in spec for c in "*?[{")


def expand_spec(spec: str) -> list[str]:
    """The shard URLs of a glob/brace/pipe spec (in spec order; globs sorted)."""
    if spec.startswith("pipe:"):
        return list(braceexpand(spec))
    urls: list[str] = []
    for pattern in braceexpand(spec):
        if any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern) if p.endswith(".tar"))
            if not matches:
                raise FeatureFormatError(f"{pattern}: no shard matches this pattern")
            urls.extend(matches)
        else:
            if not Path(pattern).is_file():
                raise FeatureFormatError(f"{pattern}: shard not found")
            urls.append(pattern)
    return urls


@dataclass
class ShardSet:
    """The resolved shards of a spec and their manifest."""

    urls: list[str]
    manifest: Manifest
    manifest_file: Optional[Path]

    @property
    def names(self) -> list[str]:
        return [shard_name(u) for u in self.urls]

    def digest(self) -> str:
        """Identity of the shard list (names and counts), kept in the reader's state."""
        text = "\n".join(f"{n}:{self.manifest.shards.get(n, -1)}" for n in self.names)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def resolve_shards(spec: str, manifest: Optional[str] = None) -> ShardSet:
    """Shards and manifest of `spec` (see the module docstring); errors name the file."""
    spec = str(spec)
    if not is_pattern(spec):
        root = Path(spec)
        if not root.is_dir():
            raise FeatureFormatError(f"{root}: not a shard directory, glob, brace pattern or pipe: spec")
        loaded = Manifest.load(manifest or root)
        urls = [str(root / name) for name in sorted(loaded.shards)]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise FeatureFormatError(f"{missing[0]}: listed in {root / MANIFEST} but not on disk")
        return ShardSet(urls, loaded, Path(manifest) if manifest else root / MANIFEST)
    urls = expand_spec(spec)
    if manifest is None and spec.startswith("pipe:"):
        raise FeatureFormatError(f"{spec}: a pipe: spec needs the manifest given (data.manifest / --manifest)")
    loaded = Manifest.load(manifest or spec)
    unknown = [u for u in urls if shard_name(u) not in loaded.shards]
    if unknown:
        raise FeatureFormatError(f"{unknown[0]}: not listed in the manifest (a stray or unfinished shard?)")
    return ShardSet(urls, loaded, Path(manifest) if manifest else None)


def iter_tar_samples(url: str, on_error: Callable[[Exception], None]) -> Iterator[dict]:
    """Samples of one shard as WebDataset dicts (`__key__`, `__url__`, one bytes entry per member).

    Local files are read with random access (tarfile skips through the file: about the speed
    of a raw read, several times faster than a stream); `pipe:` and other URLs are streamed
    through `webdataset.gopen`. A tar that cannot be read further calls `on_error` and ends the
    shard; members are grouped into samples by key as WebDataset does. (tarfile stops quietly
    at a bad header after the first one, so a local file's end-of-archive block is checked too.)
    """
    local = not url.startswith("pipe:") and "://" not in url
    stream = None
    try:
        stream = None if local else wds.gopen(url)
        with tarfile.open(url, "r:") if local else tarfile.open(fileobj=stream, mode="r|") as tar:
            sample: dict = {}
            for member in tar:
                match = _KEY_EXT.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = tar.extractfile(member).read()
            if sample:
                yield sample
            if local:
                _check_end_of_archive(url, tar.offset)
    except (tarfile.TarError, OSError, EOFError) as err:
        on_error(err)
    finally:
        if not local and stream is not None:
            stream.close()


def _check_end_of_archive(path: str, offset: int) -> None:
    """tarfile ends iteration at the first header it cannot parse: make that an error unless it
    is the end-of-archive block (a truncated or overwritten tar would lose samples silently)."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    if block != b"\0" * 512:
        raise tarfile.ReadError(f"no valid tar header at byte {offset} (truncated or corrupt file)")
