"""How the reader moves bytes: worker processes send locations and the main process reads the
tensors (values exact, padding zero); shards are read ahead, except while a resume replays."""

from __future__ import annotations

import os
import tarfile
import threading

import pytest
import torch
from dopsd_data_tools.bench import drop_page_cache
from torch.utils.data import DataLoader

from dopsd_scale.data import reader as reader_module
from dopsd_scale.data.format import decode_sample
from dopsd_scale.data.reader import Batch, FeatureStream, UnreadBatch, build_loader
from dopsd_scale.data.shards import READ_AHEAD_THREAD, is_cached, read_through, start_read_ahead

from .conftest import write_feature_shards
from .test_reader_split import epoch_batches

DIM = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_feature_shards(tmp_path_factory.mktemp("reader_io") / "feats", num_shards=4, per_shard=6)


def stored(shards) -> dict[str, dict[str, torch.Tensor]]:
    """Every sample's tensors as written, by key (read with tarfile, not by the reader)."""
    out = {}
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".safetensors"):
                    key = m.name.split(".")[0]
                    raw = {"__key__": key, "safetensors": tar.extractfile(m).read()}
                    json_member = tar.extractfile(f"{key}.json")
                    raw["json"] = json_member.read()
                    out[key] = decode_sample(raw).tensors
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_hold_the_stored_values_and_zero_padding(shards, workers):
    truth = stored(shards)
    loader = build_loader(str(shards), batch_size=3, feature_dim=DIM, num_workers=workers, shuffle_buffer=4)
    batches = epoch_batches(loader, workers)
    assert batches and all(isinstance(b, Batch) for b in batches)
    for batch in batches:
        for cond, name in ((batch.student, "student"), (batch.teacher, "teacher")):
            for row, key in enumerate(batch.keys):
                n = cond.sizes[row]
                assert torch.equal(cond.feats[row, :n], truth[key][name])
                assert cond.mask[row].sum() == n and not cond.feats[row, n:].any()


def test_workers_send_locations_of_local_shards_and_tensors_of_streamed_ones(shards):
    local = FeatureStream(sorted(str(p) for p in shards.glob("*.tar")), 2, DIM, shuffle_buffer=0)
    item = next(iter(DataLoader(local, batch_size=None, num_workers=1)))
    assert isinstance(item, UnreadBatch) and isinstance(item.read(), Batch)
    piped = FeatureStream([f"pipe:cat {p}" for p in sorted(shards.glob("*.tar"))], 2, DIM, shuffle_buffer=0)
    assert isinstance(next(iter(DataLoader(piped, batch_size=None, num_workers=1))), Batch)


def test_shards_are_read_ahead_but_not_while_a_resume_replays(shards, monkeypatch):
    asked: list[str] = []
    monkeypatch.setattr(reader_module, "start_read_ahead", lambda url: asked.append(url.rsplit("/", 1)[-1]))
    kw = dict(batch_size=1, feature_dim=DIM, shuffle_buffer=0)
    fresh = build_loader(str(shards), **kw)
    next(fresh)
    order = list(asked)  # this epoch's first shard and the next, before the first batch
    assert len(order) == 2
    for _ in range(6):  # into the second shard: the third is asked for
        next(fresh)
    assert len(asked) == 3 and asked[:2] == order

    asked.clear()
    resumed = build_loader(str(shards), **kw)
    resumed.load_state_dict(fresh.state_dict())  # 7 consumed: replays the first shard and 1 sample
    next(resumed)
    assert asked == []  # the replayed shards were walked for their headers only
    for _ in range(5):  # into this epoch's third shard
        next(resumed)
    assert len(asked) == 2 and not set(asked) & set(order)


def test_read_ahead_is_a_quiet_hint(tmp_path, monkeypatch):
    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    before = threading.active_count()
    start_read_ahead("pipe:cat nothing.tar")  # streamed shards are not read ahead
    assert threading.active_count() == before
    start_read_ahead(str(tmp_path / "missing.tar"))  # the reader itself reports missing shards
    for thread in threading.enumerate():
        if thread.name == READ_AHEAD_THREAD:
            thread.join()
    assert errors == []


def test_read_ahead_reads_only_what_the_page_cache_lacks(tmp_path, monkeypatch):
    path = tmp_path / "shard.tar"
    path.write_bytes(os.urandom(6 << 20))  # two 4 MiB chunks
    if not drop_page_cache([str(path)]) or not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("the platform cannot evict a file or probe the page cache")
    with open(path, "rb") as f:
        cold = is_cached(f.fileno(), 0, 1 << 20)
    reads = []
    preadv = os.preadv

    def counted(fd, buffers, offset, *flags):
        if not flags:  # a real read, not a probe
            reads.append(offset)
        return preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", counted)
    read_through(str(path), skip_cached=True)
    with open(path, "rb") as f:
        if cold or not is_cached(f.fileno(), 0, 6 << 20):
            pytest.skip("this file system does not tell what is cached")
    assert reads == [0, 4 << 20]
    reads.clear()
    read_through(str(path), skip_cached=True)  # every chunk cached now: nothing read again
    assert reads == []
    read_through(str(path))  # the raw read of bench-data reads everything
    assert reads == [0, 4 << 20]
