"""Streaming reader of feature shards: rank/worker split, seeded shuffle, bucket batches, resume.

The stream is a pure function of (shards, seed, rank, world size, worker count): every epoch the
shard order is shuffled with `seed + epoch`, shards are dealt to ranks and then to DataLoader
workers round-robin, samples pass a seeded shuffle buffer, and batches are cut per aspect
bucket. Epochs follow each other without end. The resumable position is the number of batches
a rank has consumed; a resumed reader with the same world size and worker count replays its
stream up to that point and then yields exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..models.spec import Condition
from .format import FeatureFormatError, FeatureSample, Manifest, decode_sample

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One bucket-homogeneous batch: both conditions padded with masks, plus metadata."""

    student: Condition
    teacher: Condition
    bucket: tuple[int, int]
    keys: list[str]
    latents: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str) -> "Batch":
        latents = None if self.latents is None else self.latents.to(device)
        return Batch(self.student.to(device), self.teacher.to(device), self.bucket, self.keys, latents)


def pad_features(feats: list[torch.Tensor]) -> Condition:
    """Right-pad [L_i, D] features to [B, max L, D] with a boolean mask."""
    longest = max(f.shape[0] for f in feats)
    out = feats[0].new_zeros(len(feats), longest, feats[0].shape[1])
    mask = torch.zeros(len(feats), longest, dtype=torch.bool)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return Condition(feats=out.float(), mask=mask)


def collate(samples: list[FeatureSample]) -> Batch:
    buckets = {s.bucket for s in samples}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}")
    teacher = pad_features([s.tensors["teacher"] for s in samples])
    if all("ref_latents" in s.tensors for s in samples):
        teacher.ref_latents = torch.stack([s.tensors["ref_latents"].float() for s in samples])
    latents = None
    if all("latents" in s.tensors for s in samples):
        latents = torch.stack([s.tensors["latents"].float() for s in samples])
    return Batch(
        student=pad_features([s.tensors["student"] for s in samples]),
        teacher=teacher,
        bucket=samples[0].bucket,
        keys=[s.key for s in samples],
        latents=latents,
    )


def list_shards(path: str | Path) -> list[str]:
    """Shards of a feature directory in manifest order."""
    root = Path(path)
    manifest = Manifest.load(root)
    shards = [str(root / name) for name in sorted(manifest.shards)]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FeatureFormatError(f"{missing[0]}: listed in {root / 'manifest.json'} but not on disk")
    return shards


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
        self.shards, self.batch_size, self.feature_dim = shards, batch_size, feature_dim
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.skip_batches = 0  # set by the loader when resuming (per worker)

    # ---- the deterministic stream ------------------------------------------------------
    def _my_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        order = list(self.shards)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        mine = order[self.rank :: self.world_size]
        return mine[worker::num_workers]

    def _samples(self, shards: list[str], skipped: list) -> Iterator[FeatureSample]:
        for raw in wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False):
            try:
                sample = decode_sample(raw)
                self._check_width(sample)
                yield sample
            except FeatureFormatError as err:
                skipped.append(str(err))
                log.warning("skipping sample: %s", err)

    def _check_width(self, sample: FeatureSample) -> None:
        for name in ("student", "teacher"):
            width = sample.tensors[name].shape[1]
            if width != self.feature_dim:
                raise FeatureFormatError(f"{sample.key}: '{name}' width {width}, the model expects {self.feature_dim}")

    def _shuffled(self, samples: Iterator[FeatureSample], rng: random.Random) -> Iterator[FeatureSample]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[FeatureSample] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def _batches(self, samples: Iterator[FeatureSample]) -> Iterator[list[FeatureSample]]:
        """Cut batches per bucket; leftovers at the end of an epoch are dropped (and stated)."""
        pending: dict[tuple[int, int], list[FeatureSample]] = defaultdict(list)
        for s in samples:
            group = pending[s.bucket]
            group.append(s)
            if len(group) == self.batch_size:
                yield pending.pop(s.bucket)

    def stream(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[int, list[FeatureSample]]]:
        """(epoch, samples of one batch) forever; raises if an epoch yields nothing."""
        epoch = 0
        while True:
            skipped: list[str] = []
            shards = self._my_shards(epoch, worker, num_workers)
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
            produced = 0
            for batch in self._batches(self._shuffled(self._samples(shards, skipped), rng)):
                produced += 1
                yield epoch, batch
            if produced == 0:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: epoch {epoch} gave no full batch of {self.batch_size} "
                    f"from {len(shards)} shard(s) ({len(skipped)} sample(s) skipped)"
                )
            epoch += 1

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader asks its workers round-robin starting at worker 0, so after `skip`
        # batches the stream's worker (skip % W) must sit in loader slot 0: rotate the roles.
        worker = (worker + self.skip_batches) % num_workers
        to_skip = _worker_share(self.skip_batches, worker, num_workers)
        for i, (_, samples) in enumerate(self.stream(worker, num_workers)):
            if i >= to_skip:
                yield collate(samples)


def _worker_share(consumed: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` delivered out of `consumed`, given the loader's round-robin."""
    return consumed // num_workers + (1 if worker < consumed % num_workers else 0)


class FeatureLoader:
    """A DataLoader over :class:`FeatureStream` that knows its position (a state dict)."""

    def __init__(self, stream: FeatureStream, num_workers: int = 0):
        self.stream, self.num_workers = stream, num_workers
        self.consumed = 0
        self._iter: Optional[Iterator[Batch]] = None

    def __iter__(self) -> "FeatureLoader":
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
            )
            self._iter = iter(loader)
        batch = next(self._iter)
        self.consumed += 1
        return batch

    def state_dict(self) -> dict:
        s = self.stream
        return {
            "consumed_batches": self.consumed,
            "rank": s.rank,
            "world_size": s.world_size,
            "num_workers": self.num_workers,
            "seed": s.seed,
            "batch_size": s.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        s = self.stream
        same = (state["world_size"], state["num_workers"], state["seed"], state["batch_size"]) == (
            s.world_size,
            self.num_workers,
            s.seed,
            s.batch_size,
        )
        if not same:
            log.warning("data layout changed since the checkpoint: the data stream restarts at epoch 0")
            self.consumed = 0
        else:
            self.consumed = int(state["consumed_batches"])
        self._iter = None


def build_loader(data_dir: str, batch_size: int, feature_dim: int, num_workers: int = 0, shuffle_buffer: int = 64,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> FeatureLoader:
    manifest = Manifest.load(data_dir)
    if manifest.feature_dim != feature_dim:
        raise FeatureFormatError(
            f"{data_dir}/manifest.json: features are {manifest.feature_dim} wide, the model expects {feature_dim}"
        )
    stream = FeatureStream(list_shards(data_dir), batch_size, feature_dim, rank, world_size, shuffle_buffer, seed)
    return FeatureLoader(stream, num_workers)
