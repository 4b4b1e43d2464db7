"""Streaming reader of feature shards: rank/worker split, seeded shuffle, bucket batches, resume.

The shards come from a directory, glob, brace pattern or `pipe:` command (see `shards.py`). The
stream is a pure function of (shards, seed, world size, worker count, plan) (see `position.py`):
each epoch deals the seeded shard order to the rank x worker slots, each slot passes its
samples through a shuffle buffer seeded by (seed, epoch, rank, worker) and cuts batches per
aspect bucket, so every batch is bucket-homogeneous; a bucket's last partial batch of an epoch
is dropped. Epochs follow each other without end and every batch carries its epoch. A sample
with caption variants shows the variant `pick_variant(seed, epoch, key)` (see `format.py`).

Every sample is checked before it is batched (members present, safetensors header sound, [L, D]
features of the model's width) without decoding its tensors; a bad one is skipped, counted,
logged and, when a report file is given, written to it with its shard, key and reason. A local
shard's tensors are read only for the batches a reader yields, each straight from the file into
its row of the padded batch in the stored dtype (one copy, as a raw read makes; the shuffle
buffer holds locations, not bytes), which also keeps replay on resume cheap. DataLoader workers
send those locations (`UnreadBatch`) and the main process reads the tensors (in the pin-memory
thread, into page-locked memory, when CUDA is there). Each shard is read ahead, sequentially,
by a background thread while the one before it is consumed (not while a resume replays).

The position (`state_dict`) is the batches consumed plus, per worker, its epoch and the shards it
has completely delivered. Same layout: exact resume. Another world size or worker count: the
earliest unfinished epoch is completed with the shards not yet delivered, without skipping any
sample; `position.py` states exactly what may repeat. Pass every rank's state to
`load_state_dict` (a list) for that guarantee.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..models.spec import Condition
from .format import FeatureFormatError, FeatureSample, StoredTensor, check_stored_sample, count_variants, pick_variant
from .position import STATE_VERSION, Plan, elastic_plan, epoch_shards, same_layout, worker_share
from .shards import ShardSet, TarMember, iter_tar_samples, resolve_shards, shard_name, start_read_ahead

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One bucket-homogeneous batch: both conditions padded with masks, plus metadata."""

    student: Condition
    teacher: Condition
    bucket: tuple[int, int]
    keys: list[str]
    latents: Optional[torch.Tensor] = None
    epoch: int = 0
    """The epoch of the worker that cut this batch."""
    worker: int = 0
    """That worker's stream index (its slot is rank + world_size * worker)."""
    done_shards: tuple[str, ...] = ()
    """Shards of that worker's epoch delivered completely, up to and including this batch."""
    skipped: list[dict] = field(default_factory=list)
    """Bad samples the worker met since its previous batch: {shard, key, reason}."""

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """On `device`, in the stored dtype (the model casts where it consumes them)."""
        latents = None if self.latents is None else self.latents.to(device, non_blocking=non_blocking)
        return replace(
            self,
            student=self.student.to(device, non_blocking=non_blocking),
            teacher=self.teacher.to(device, non_blocking=non_blocking),
            latents=latents,
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies, so that `to(cuda, non_blocking=True)` overlaps (DataLoader pin_memory)."""
        latents = None if self.latents is None else self.latents.pin_memory()
        return replace(self, student=self.student.pin_memory(), teacher=self.teacher.pin_memory(), latents=latents)


def pad_features(feats: list[torch.Tensor | StoredTensor]) -> Condition:
    """Right-pad [L_i, D] features to [B, max L, D] in their stored dtype (bf16 as cached: half the
    bytes of fp32 to copy and to send to the device) with a boolean mask. Stored tensors are read
    straight into their rows; only the padding is zeroed (each byte is written once)."""
    lengths = [f.shape[0] for f in feats]
    out = _empty((len(feats), max(lengths), feats[0].shape[1]), feats[0].dtype)
    zero = out.view(torch.uint8).numpy()  # a plain memset per row: no torch dispatch in the loop
    for i, (f, n) in enumerate(zip(feats, lengths)):
        _fill(out[i, :n], f)
        zero[i, n:] = 0
    mask = torch.arange(out.shape[1]) < torch.tensor(lengths)[:, None]
    return Condition(feats=out, mask=mask.pin_memory() if out.is_pinned() else mask, sizes=tuple(lengths))


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised batch memory; page-locked in a CUDA process's main reader (the caching host
    allocator reuses warm blocks, and DataLoader's pin_memory then has nothing left to copy).
    Worker processes never touch CUDA."""
    return torch.empty(shape, dtype=dtype, pin_memory=get_worker_info() is None and torch.cuda.is_available())


def _fill(dest: torch.Tensor, src: torch.Tensor | StoredTensor) -> None:
    if isinstance(src, StoredTensor):
        src.copy_into(dest)
    else:
        dest.copy_(src)


def _stack(items: list[torch.Tensor | StoredTensor]) -> torch.Tensor:
    """`torch.stack` that also takes stored tensors (read in place)."""
    out = _empty((len(items), *items[0].shape), items[0].dtype)
    for i, item in enumerate(items):
        _fill(out[i], item)
    return out


def collate(samples: list[FeatureSample]) -> Batch:
    buckets = {s.bucket for s in samples}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}")
    refs = {reference_count(s.tensors) for s in samples}
    if len(refs) != 1:  # the reader groups by (bucket, references): a model shares one layout per batch
        raise ValueError(f"a batch mixes samples with {sorted(refs)} reference images")
    teacher = pad_features([s.tensors["teacher"] for s in samples])
    if refs != {0}:
        teacher.ref_latents = _stack([s.tensors["ref_latents"] for s in samples])
    latents = None
    if all("latents" in s.tensors for s in samples):
        latents = _stack([s.tensors["latents"] for s in samples])
    return Batch(
        student=pad_features([s.tensors["student"] for s in samples]),
        teacher=teacher,
        bucket=samples[0].bucket,
        keys=[s.key for s in samples],
        latents=latents,
    )


@dataclass
class UnreadBatch:
    """A batch cut by a DataLoader worker whose tensors are still in local shard files.

    Sending a collated batch from a worker process costs a copy into a fresh shared-memory
    segment per tensor, page faults on both sides, and in a CUDA run one more copy into
    page-locked memory: measured on CPU, worker processes delivered 5x fewer samples/s than the
    reader in the main process. The worker does the Python-heavy part (tar walk, header checks,
    shuffle, batching) and sends the tensors' locations; the main process reads each tensor once,
    straight into its row of the batch: in the DataLoader's pin-memory thread (in page-locked
    memory, beside the training step) when it has one, else in `FeatureLoader.__next__`.
    """

    samples: list[FeatureSample]
    epoch: int
    worker: int
    done_shards: tuple[str, ...]
    skipped: list[dict]

    def read(self) -> Batch:
        batch = collate(self.samples)
        return replace(batch, epoch=self.epoch, worker=self.worker, done_shards=self.done_shards, skipped=self.skipped)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (the batch memory is page-locked there)."""
        return self.read().pin_memory()


def _in_local_files(samples: list[FeatureSample]) -> bool:
    """Every tensor is a located part of a local shard file (so any process can read it)."""
    return all(
        isinstance(t, StoredTensor) and isinstance(t.blob, TarMember) for s in samples for t in s.tensors.values()
    )


def reference_count(tensors) -> int:
    """Reference images a sample carries (`ref_latents` [R, C, h, w]); 0 without. `tensors` may be
    the tensors or their shapes."""
    ref = tensors.get("ref_latents")
    return 0 if ref is None else int(ref[0] if isinstance(ref, list) else ref.shape[0])


@dataclass
class _Ref:
    """A checked sample whose tensors are not decoded yet."""

    key: str
    shard: str
    meta: dict
    tensors: dict[str, StoredTensor]
    """Located by the header check, read only when the sample is batched."""
    variants: int
    references: int = 0

    @property
    def bucket(self) -> tuple[int, int]:
        h, w = self.meta["bucket"]
        return int(h), int(w)

    @property
    def group(self) -> tuple[tuple[int, int], int]:
        """Samples batched together: one aspect bucket and one number of reference images."""
        return self.bucket, self.references

    def load(self, seed: int, epoch: int) -> FeatureSample:
        """The sample with the caption variant this epoch shows under the plain names (still unread)."""
        tensors = dict(self.tensors)
        v = pick_variant(seed, epoch, self.key, self.variants)
        if v:
            tensors["student"], tensors["teacher"] = tensors[f"student_{v}"], tensors[f"teacher_{v}"]
        return FeatureSample(self.key, self.meta, tensors)


class _Progress:
    """Which shards of a worker's epoch are completely delivered (read, and every sample out)."""

    def __init__(self):
        self.read: Counter = Counter()
        self.out: Counter = Counter()
        self.closed: set[str] = set()
        self.done: list[str] = []

    def _check(self, shard: str) -> None:
        if shard in self.closed and self.out[shard] == self.read[shard] and shard not in self.done:
            self.done.append(shard)

    def close(self, shard: str) -> None:
        self.closed.add(shard)
        self._check(shard)

    def deliver(self, refs: list[_Ref]) -> None:
        for r in refs:
            self.out[r.shard] += 1
        for shard in {r.shard for r in refs}:
            self._check(shard)


class FeatureStream(IterableDataset):
    """Endless bucket-batched stream for one rank; use with :func:`build_loader`."""

    def __init__(
        self,
        shards: list[str],
        batch_size: int,
        feature_dim: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 64,
        seed: int = 0,
    ):
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shard(s) cannot feed {world_size} ranks: write more, smaller shards")
        self.urls = {shard_name(u): u for u in shards}
        self.names = [shard_name(u) for u in shards]
        self.batch_size, self.feature_dim = batch_size, feature_dim
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.skip_batches = 0  # set by the loader when resuming (replayed, then dropped)
        self.plan: Optional[Plan] = None  # set by the loader after a resume on another layout
        self._skipped: list[dict] = []
        self._read_ahead = True  # off while a resume replays batches (that reads headers only)

    # ---- reading and checking ----------------------------------------------------------------
    def _skip(self, shard: str, key: str, reason: str) -> None:
        self._skipped.append({"shard": shard, "key": key, "reason": reason})
        log.warning("skipping sample %s:%s: %s", shard, key, reason)

    def _read_shard(self, name: str) -> Iterator[_Ref]:
        def on_error(err: Exception) -> None:
            self._skip(name, "?", f"unreadable tar data, rest of the shard lost ({type(err).__name__}: {err})")

        for raw in iter_tar_samples(self.urls[name], on_error, lazy=("safetensors",)):
            key = raw.get("__key__", "?")
            try:
                meta, tensors = check_stored_sample(raw, self.feature_dim)
            except FeatureFormatError as err:
                self._skip(name, key, str(err))
                continue
            yield _Ref(key, name, meta, tensors, count_variants(tensors), reference_count(tensors))

    def _samples(self, names: list[str], progress: _Progress) -> Iterator[_Ref]:
        requested: set[str] = set()
        for i, name in enumerate(names):
            for ahead in names[i : i + 2] if self._read_ahead else ():  # the disk works while we do
                if ahead not in requested:
                    requested.add(ahead)
                    start_read_ahead(self.urls[ahead])
            for ref in self._read_shard(name):
                progress.read[name] += 1
                yield ref
            progress.close(name)

    def _shuffled(self, refs: Iterator[_Ref], rng: random.Random) -> Iterator[_Ref]:
        if self.shuffle_buffer <= 1:
            yield from refs
            return
        buf: list[_Ref] = []
        for r in refs:
            buf.append(r)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def _batches(self, refs: Iterator[_Ref], progress: _Progress) -> Iterator[list[_Ref]]:
        """Cut batches per bucket (and reference count); a group's leftovers at the end of an epoch
        are dropped."""
        pending: dict[tuple, list[_Ref]] = defaultdict(list)
        for r in refs:
            group = pending[r.group]
            group.append(r)
            if len(group) == self.batch_size:
                batch = pending.pop(r.group)
                progress.deliver(batch)
                yield batch
        for leftovers in pending.values():
            progress.deliver(leftovers)

    # ---- the deterministic stream -----------------------------------------------------------
    def stream(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[int, list[_Ref], tuple[str, ...]]]:
        """(epoch, refs of one batch, done shards) forever; raises if a whole epoch yields nothing."""
        slot, slots = self.rank + self.world_size * worker, self.world_size * num_workers
        epoch = self.plan.epoch if self.plan else 0
        while True:
            order, partial = epoch_shards(self.names, self.seed, epoch, self.plan)
            mine = order[slot::slots]
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
            progress, produced = _Progress(), 0
            for refs in self._batches(self._shuffled(self._samples(mine, progress), rng), progress):
                produced += 1
                yield epoch, refs, tuple(progress.done)
            if produced == 0 and not partial:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: epoch {epoch} gave no full batch of {self.batch_size} "
                    f"from {len(mine)} shard(s) ({len(self._skipped)} sample(s) skipped)"
                )
            epoch += 1

    def __iter__(self) -> Iterator[Batch | UnreadBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader asks its workers round-robin starting at worker 0, so after `skip`
        # batches the stream's worker (skip % W) must sit in loader slot 0: rotate the roles.
        worker = (worker + self.skip_batches) % num_workers
        to_skip = worker_share(self.skip_batches, worker, num_workers)
        self._read_ahead = to_skip == 0
        for i, (epoch, refs, done) in enumerate(self.stream(worker, num_workers)):
            if i < to_skip:
                self._skipped.clear()  # reported by the run that consumed these batches
                self._read_ahead = i + 1 == to_skip
                continue
            samples = [r.load(self.seed, epoch) for r in refs]
            unread = UnreadBatch(samples, epoch, worker, done, self._skipped)
            self._skipped = []
            yield unread if info is not None and _in_local_files(samples) else unread.read()


class FeatureLoader:
    """A DataLoader over :class:`FeatureStream` that knows its position (a state dict)."""

    def __init__(
        self,
        stream: FeatureStream,
        num_workers: int = 0,
        shards: Optional[ShardSet] = None,
        report_path: Optional[str] = None,
    ):
        slots = stream.world_size * max(1, num_workers)
        if len(stream.names) < slots:
            raise ValueError(
                f"{len(stream.names)} shard(s) cannot feed {stream.world_size} rank(s) x "
                f"{max(1, num_workers)} worker(s): write more, smaller shards"
            )
        self.stream, self.num_workers, self.shards = stream, num_workers, shards
        self.manifest = shards.manifest if shards else None
        self.report_path = Path(report_path) if report_path else None
        self.consumed = 0
        self.skipped = 0
        self.positions: dict[int, dict] = {}  # stream worker -> {"epoch", "done"} of its last batch
        self._iter: Optional[Iterator[Batch]] = None

    def __iter__(self) -> FeatureLoader:
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            self.stream.skip_batches = self.consumed
            loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=False,
                prefetch_factor=4 if self.num_workers else None,
                pin_memory=torch.cuda.is_available(),
            )
            self._iter = iter(loader)
        batch = next(self._iter)
        if isinstance(batch, UnreadBatch):  # from a worker, without a pin-memory thread
            batch = batch.read()
        self.consumed += 1
        self.positions[batch.worker] = {"epoch": batch.epoch, "done": list(batch.done_shards)}
        self._report(batch.skipped)
        return batch

    @property
    def epoch(self) -> int:
        """The epoch of the slowest worker (all of its earlier epochs are complete)."""
        start = self.stream.plan.epoch if self.stream.plan else 0
        return min((p["epoch"] for p in self.positions.values()), default=start)

    def _report(self, rows: list[dict]) -> None:
        self.skipped += len(rows)
        if rows and self.report_path is not None:
            with open(self.report_path, "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({"rank": self.stream.rank, **row}, ensure_ascii=False) + "\n")

    # ---- position ------------------------------------------------------------------------------
    def _layout(self) -> dict:
        s = self.stream
        digest = self.shards.digest() if self.shards else None
        return {
            "world_size": s.world_size,
            "num_workers": self.num_workers,
            "seed": s.seed,
            "batch_size": s.batch_size,
            "shards_digest": digest,
        }

    def state_dict(self) -> dict:
        """JSON-safe position of this rank (see `position.py` for what a resume does with it)."""
        return {
            "version": STATE_VERSION,
            "consumed_batches": self.consumed,
            "rank": self.stream.rank,
            **self._layout(),
            "plan": self.stream.plan.to_json() if self.stream.plan else None,
            "workers": {str(w): p for w, p in sorted(self.positions.items())},
        }

    def load_state_dict(self, state: Union[dict, list[dict]]) -> None:
        """Resume from this rank's state, or from the list of every rank's states (needed to
        resume on another layout without repeats beyond those `position.py` states)."""
        states = [state] if isinstance(state, dict) else list(state)
        current = self._layout()
        mine = next((s for s in states if int(s.get("rank", 0)) == self.stream.rank), states[0])
        self._iter = None
        self.positions = {}
        if same_layout(mine, current) and int(mine.get("rank", 0)) == self.stream.rank:
            self.consumed = int(mine["consumed_batches"])
            self.stream.plan = Plan.from_json(mine.get("plan"))
            self.positions = {int(w): p for w, p in (mine.get("workers") or {}).items()}
        elif mine.get("version") == STATE_VERSION and mine.get("shards_digest") == current["shards_digest"]:
            self.consumed = 0
            self.stream.plan = elastic_plan(states, self.stream.names)
        else:
            log.warning("the shards or the reader changed since the checkpoint: the data stream restarts at epoch 0")
            self.consumed, self.stream.plan = 0, None


def build_loader(
    data_dir: str,
    batch_size: int,
    feature_dim: int,
    num_workers: int = 0,
    shuffle_buffer: int = 64,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    manifest: Optional[str] = None,
    report_path: Optional[str] = None,
) -> FeatureLoader:
    """The reader of `data_dir` (a directory, glob, brace pattern or pipe: spec) for one rank."""
    shards = resolve_shards(data_dir, manifest)
    if shards.manifest.feature_dim != feature_dim:
        where = shards.manifest_file or data_dir
        raise FeatureFormatError(
            f"{where}: features are {shards.manifest.feature_dim} wide, the model expects {feature_dim}"
        )
    stream = FeatureStream(shards.urls, batch_size, feature_dim, rank, world_size, shuffle_buffer, seed)
    return FeatureLoader(stream, num_workers, shards, report_path)
