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
import os
import re
import struct
import tarfile
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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


@dataclass(frozen=True)
class TarMember:
    """A member of a local tar file, read on demand (slices, `readinto`, `bytes()`).

    The reader holds the samples of its shuffle buffer by location only and reads their tensors
    once, straight into the batch (see `format.StoredTensor`): no blob per sample in memory, and
    a replay on resume reads headers only. `head` holds the member's first bytes, read together
    with its tar header, so that checking a safetensors header costs no extra read.
    """

    path: str
    offset: int
    size: int
    head: bytes = b""

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(self.size)
        if stop <= len(self.head):
            return self.head[start:stop]
        out = bytearray(max(0, stop - start))
        self.readinto(out, start)
        return bytes(out)

    def __bytes__(self) -> bytes:
        return self[:]

    def readinto(self, buffer, start: int = 0) -> None:
        """Fill `buffer` (writable, any buffer) with the member's bytes from `start` on."""
        view = memoryview(buffer).cast("B")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{self.path}: member at byte {self.offset} ends early (the file changed?)")
                done += n


def is_local(url: str) -> bool:
    """A shard in a local file (random access), not a `pipe:` command or a remote URL (streamed)."""
    return not url.startswith("pipe:") and "://" not in url


_CHUNK = 1 << 22
_PROBE_STRIDE = 1 << 18  # pages probed per chunk: 16, a few microseconds against a 4 MiB copy


def read_through(path: str, skip_cached: bool = False) -> None:
    """Read a file from start to end into one reused buffer (the bytes are dropped); with
    `skip_cached`, chunks already in the page cache are not read again (see `is_cached`)."""
    buffer = bytearray(_CHUNK)
    with open(path, "rb", buffering=0) as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        for offset in range(0, size, _CHUNK):
            if not (skip_cached and is_cached(fd, offset, min(_CHUNK, size - offset))):
                os.preadv(fd, [buffer], offset)


def is_cached(fd: int, offset: int, length: int) -> bool:
    """Whether the bytes [offset, offset + length) of an open file are in the page cache, probed
    one page per 256 KiB with a 1-byte read that may not wait for the disk (Linux's RWF_NOWAIT).
    False where the platform or file system cannot tell."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None:
        return False
    probe = bytearray(1)
    try:
        return all(os.preadv(fd, [probe], at, nowait) for at in range(offset, offset + length, _PROBE_STRIDE))
    except OSError:  # BlockingIOError: not cached; EOPNOTSUPP: cannot tell
        return False


READ_AHEAD_THREAD = "dopsd-read-ahead"


def start_read_ahead(url: str) -> None:
    """Read a local shard into the page cache in a background thread (no-op for streamed ones).

    The reader walks a shard's headers first and reads its tensors later in shuffled order:
    small jumps that defeat the kernel's sequential read-ahead, so a shard not yet cached would
    be read at the disk's random-access speed, and only while the reader waits. One sequential
    read of the file ahead of the reader (the bytes are dropped; the page cache keeps them)
    makes the reader's own reads memory copies and overlaps the disk with its work.
    (`posix_fadvise(WILLNEED)` instead of the read was measured and gained much less.) Chunks
    already cached are skipped: copying them again cost the reader 10-20% when every shard
    was in the page cache (the copy competes for the memory bus).
    """
    if is_local(url):
        threading.Thread(target=_read_ahead, args=(url,), name=READ_AHEAD_THREAD, daemon=True).start()


def _read_ahead(url: str) -> None:
    try:
        read_through(url, skip_cached=True)
    except OSError:
        pass  # only a hint: the reader itself reports a missing or unreadable shard with its name


def iter_tar_samples(url: str, on_error: Callable[[Exception], None], lazy: Collection[str] = ()) -> Iterator[dict]:
    """Samples of one shard as WebDataset dicts (`__key__`, `__url__`, one bytes entry per member;
    in a local file, members whose extension is in `lazy` are `TarMember`s, read on demand).

    Local files are read with random access (about the speed of a raw read, several times faster
    than a stream): with `lazy`, by `walk_local_tar` (the reader's path: headers only); else by
    tarfile. `pipe:` and other URLs are streamed through `webdataset.gopen`. A tar that cannot be
    read further calls `on_error` and ends the shard; members are grouped into samples by key as
    WebDataset does. (tarfile stops quietly at a bad header after the first one, so a local
    file's end-of-archive block is checked too.)
    """
    local = is_local(url)
    stream = None
    try:
        if local and lazy:
            yield from _group(url, walk_local_tar(url, lazy))
            return
        stream = None if local else wds.gopen(url)
        with tarfile.open(url, "r:") if local else tarfile.open(fileobj=stream, mode="r|") as tar:
            yield from _group(url, ((m.name, lambda m=m: tar.extractfile(m).read()) for m in tar if m.isfile()))
            if local:
                _check_end_of_archive(url, tar.offset)
    except GeneratorExit:  # before the tuple below: at interpreter exit `tarfile` may already be None
        raise
    except (tarfile.TarError, OSError, EOFError) as err:
        on_error(err)
    finally:
        if not local and stream is not None:
            stream.close()


def _group(url: str, members: Iterator[tuple[str, Any]]) -> Iterator[dict]:
    """WebDataset samples from (name, value or a function reading it) pairs of regular members.
    A `(None, error)` pair ends the shard after yielding the sample in progress, then raises."""
    sample: dict = {}
    for name, value in members:
        if name is None:
            if sample:
                yield sample
            raise value
        match = _KEY_EXT.match(name)
        if match is None:
            continue
        key, ext = match.group(1), match.group(2)
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        if not sample:
            sample = {"__key__": key, "__url__": url}
        sample[ext] = value() if callable(value) else value
    if sample:
        yield sample


_BLOCK, _HEAD = 512, 4096
_EOF_BLOCK = bytes(_BLOCK)


def walk_local_tar(path: str, lazy: Collection[str] = ()) -> Iterator[tuple[Optional[str], Any]]:
    """(name, bytes or `TarMember`) of a local tar's regular members, read header by header.

    tarfile spends most of a feature sample's read budget decoding every header field in
    Python; this walk reads each 512-byte header together with the member's first `_HEAD`
    bytes in one `pread` and decodes only the name, size and type, with what tarfile accepts
    (ustar prefixes, pax and global pax records, GNU long names, base-256 sizes, both checksum
    conventions). Members whose extension is in `lazy` are left in the file. Errors end the walk
    where tarfile's would: a bad header after the first yields `(None, ReadError)` (the sample
    in progress is kept) unless it follows a pax or long-name header (then it raises at once), a
    member cut short yields a value that raises when read.
    """
    with open(path, "rb", buffering=0) as f:
        yield from _TarWalk(path, f.fileno(), lazy).members()


class _TarWalk:
    """One walk's state: the file, and the pax / long-name records that apply to the next member."""

    def __init__(self, path: str, fd: int, lazy: Collection[str]):
        self.path, self.fd, self.lazy, self.end = path, fd, lazy, os.fstat(fd).st_size
        self.pax: dict[str, str] = {}
        self.global_pax: dict[str, str] = {}
        self.long_name: Optional[str] = None
        self.chained = False  # the last header was a pax / long-name one

    def members(self) -> Iterator[tuple[Optional[str], Any]]:
        offset = 0
        while True:
            buf = os.pread(self.fd, _BLOCK + _HEAD, offset)
            if buf[:_BLOCK] == _EOF_BLOCK:
                return
            try:
                kind, name, size = _parse_header(buf[:_BLOCK], {**self.global_pax, **self.pax})
                if kind in (b"x", b"g", b"L", b"K"):
                    self._records(kind, offset + _BLOCK, size)
            except ValueError as err:
                bad = tarfile.ReadError(f"no valid tar header at byte {offset} (truncated or corrupt file: {err})")
                if offset == 0 or self.chained:
                    raise bad from None
                yield None, bad
                return
            if kind not in (b"x", b"g", b"L", b"K"):
                member = self._member(kind, name, buf, offset + _BLOCK, size)
                if member is not None:
                    yield member
                    if callable(member[1]):
                        return
            offset += _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK

    def _records(self, kind: bytes, data: int, size: int) -> None:
        """Keep what a pax, global pax or GNU long-name header says about the next member."""
        payload = os.pread(self.fd, size, data)
        if len(payload) < size:
            raise tarfile.ReadError("unexpected end of data")
        if kind == b"x":
            self.pax = _pax_records(payload)
        elif kind == b"g":
            self.global_pax.update(_pax_records(payload))
        elif kind == b"L":
            self.long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        self.chained = True

    def _member(self, kind: bytes, name: str, buf: bytes, data: int, size: int) -> Optional[tuple[str, Any]]:
        """(name, value) of a regular member, None for anything else."""
        name = self.pax.get("path") or self.global_pax.get("path") or self.long_name or name
        self.pax, self.long_name, self.chained = {}, None, False
        if kind not in (b"0", b"\0", b"7") or (kind == b"\0" and name.endswith("/")):
            return None
        if data + size > self.end:
            return name, _failing(tarfile.ReadError("unexpected end of data"))
        match, head = _KEY_EXT.match(name), buf[_BLOCK : _BLOCK + size]
        if match is not None and match.group(2) in self.lazy:
            return name, TarMember(self.path, data, size, head)
        return name, head if len(head) == size else os.pread(self.fd, size, data)


def _failing(err: Exception) -> Callable[[], bytes]:
    def read() -> bytes:
        raise err

    return read


def _parse_header(block: bytes, pax: dict[str, str]) -> tuple[bytes, str, int]:
    """(type flag, ustar name, size) of one header block; ValueError when it is not a valid header."""
    if len(block) < _BLOCK:
        raise ValueError("short block")
    stored = _number(block[148:156])
    unsigned = sum(block) - sum(block[148:156]) + 256
    if stored != unsigned and stored != sum(struct.unpack_from("148b8x356b", block)) + 256:
        raise ValueError("bad checksum")
    kind = block[156:157]
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if prefix and kind not in (b"L", b"K", b"S"):
        name = prefix + "/" + name
    return kind, name, int(pax["size"]) if "size" in pax else _number(block[124:136])


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (positive only)."""
    if field[0] == 0o200:
        return int.from_bytes(field[1:], "big")
    if field[0] & 0x80:
        raise ValueError("negative number")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_records(payload: bytes) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records of a pax header."""
    out, pos = {}, 0
    while pos < len(payload) and payload[pos] != 0:
        space = payload.index(b" ", pos)
        length = int(payload[pos:space])
        if length <= space - pos or payload[pos + length - 1] != 0x0A:
            raise ValueError("invalid pax record")
        key, _, value = payload[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _check_end_of_archive(path: str, offset: int) -> None:
    """tarfile ends iteration at the first header it cannot parse: make that an error unless it
    is the end-of-archive block (a truncated or overwritten tar would lose samples silently)."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    if block != b"\0" * 512:
        raise tarfile.ReadError(f"no valid tar header at byte {offset} (truncated or corrupt file)")
