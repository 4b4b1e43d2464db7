"""The reader's layout guarantees: rank x worker coverage, bucket batches, variants, shard specs, bad samples."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter, defaultdict

import pytest
import torch

from dopsd_scale.data.format import FeatureFormatError, FeatureSample, encode_sample, pick_variant
from dopsd_scale.data.reader import build_loader

from .conftest import write_feature_shards

DIM = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 shards x 5 samples, two buckets, two caption variants."""
    return write_feature_shards(tmp_path_factory.mktemp("reader") / "feats", variants=2)


def epochs(loader, workers: int, last: int = 0, limit: int = 500) -> dict[int, list]:
    """Batches by epoch until every worker is past epoch `last` (each worker runs its own epochs)."""
    out, past = defaultdict(list), set()
    for _ in range(limit):
        batch = next(loader)
        out[batch.epoch].append(batch)
        if batch.epoch > last:
            past.add(batch.worker)
            if len(past) == max(1, workers):
                return out
    raise AssertionError("the epoch did not end")


def epoch_batches(loader, workers: int) -> list:
    return epochs(loader, workers)[0]


def test_two_ranks_two_workers_cover_every_sample_once_per_epoch(shards):
    for epoch in (0, 1):
        keys = Counter()
        for rank in range(2):
            loader = build_loader(
                str(shards),
                batch_size=1,
                feature_dim=DIM,
                num_workers=2,
                shuffle_buffer=4,
                seed=7,
                rank=rank,
                world_size=2,
            )
            keys.update(k for b in epochs(loader, 2, epoch)[epoch] for k in b.keys)
        assert len(keys) == 40 and set(keys.values()) == {1}, f"epoch {epoch}"


def test_every_batch_is_bucket_homogeneous_and_padded(shards):
    loader = build_loader(str(shards), batch_size=3, feature_dim=DIM, num_workers=2, shuffle_buffer=6, seed=1)
    for _ in range(30):
        b = next(loader)
        assert {(32, 32) if int(k) % 2 == 0 else (32, 48) for k in b.keys} == {b.bucket}
        lengths = [1 + int(k) % 5 for k in b.keys]
        assert b.student.mask.sum(1).tolist() == lengths
        assert b.student.feats.shape == (3, max(lengths), DIM) and b.student.feats.dtype == torch.float32
        for i, n in enumerate(lengths):
            assert torch.all(b.student.feats[i, n:] == 0)


def test_each_epoch_shows_one_caption_variant_chosen_by_seed_epoch_and_key(shards):
    loader = build_loader(str(shards), batch_size=1, feature_dim=DIM, shuffle_buffer=0, seed=5)
    shown = {}
    by_epoch = epochs(loader, 1, 1)
    for epoch in (0, 1):
        for b in by_epoch[epoch]:
            variant = int(b.teacher.feats[0, 0, 0].item())  # teacher_v is filled with v
            assert variant == pick_variant(5, epoch, b.keys[0], 2)
            shown[(epoch, b.keys[0])] = variant
    assert len(set(shown.values())) == 2
    assert any(shown[(0, k)] != shown[(1, k)] for _, k in shown)


def test_glob_brace_and_pipe_specs_read_the_same_shards(shards):
    def keys(spec, **kw):
        loader = build_loader(spec, batch_size=1, feature_dim=DIM, shuffle_buffer=0, **kw)
        return sorted(k for b in epoch_batches(loader, 1) for k in b.keys)

    whole = keys(str(shards))
    assert keys(str(shards / "features-*.tar")) == whole
    assert keys(str(shards / "features-{000000..000007}.tar")) == whole
    pipe = f"pipe:cat {shards}/features-{{000000..000003}}.tar"
    assert keys(pipe, manifest=str(shards / "manifest.json")) == whole[:20]
    with pytest.raises(FeatureFormatError, match="manifest"):
        build_loader(pipe, batch_size=1, feature_dim=DIM)


def test_a_stray_shard_is_refused_by_name(shards, tmp_path):
    data = tmp_path / "feats"
    shutil.copytree(shards, data)
    shutil.copy(data / "features-000000.tar", data / "features-000099.tar")
    with pytest.raises(FeatureFormatError, match="features-000099.tar: not listed in the manifest"):
        build_loader(str(data / "features-*.tar"), batch_size=1, feature_dim=DIM)
    build_loader(str(data), batch_size=1, feature_dim=DIM)  # a directory reads what its manifest lists


def _rewrite_member(shard, index, data: bytes):
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for i, (m, payload) in enumerate(members):
            if i == index:
                payload, m.size = data, len(data)
            tar.addfile(m, io.BytesIO(payload))


def test_bad_samples_are_skipped_counted_and_reported(shards, tmp_path):
    data = tmp_path / "feats"
    shutil.copytree(shards, data)
    wide = FeatureSample(
        "000001", {"bucket": [32, 48]}, {"student": torch.zeros(2, DIM + 1), "teacher": torch.zeros(2, DIM + 1)}
    )
    _rewrite_member(data / "features-000000.tar", 3, encode_sample(wide)["safetensors"])  # key 000001: width 9
    _rewrite_member(data / "features-000000.tar", 5, b"garbage")  # key 000002: corrupt tar member
    with tarfile.open(data / "features-000001.tar") as tar:
        cut = tar.getmembers()[4].offset  # the header of the third sample (key 000007)
    raw = (data / "features-000001.tar").read_bytes()
    (data / "features-000001.tar").write_bytes(raw[:cut] + b"\x01" * 700)  # overwritten tar data
    report = tmp_path / "report.jsonl"
    loader = build_loader(str(data), batch_size=1, feature_dim=DIM, shuffle_buffer=0, report_path=str(report))
    keys = {k for b in epoch_batches(loader, 1) for k in b.keys}
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    reasons = {(r["shard"], r["key"]): r["reason"] for r in rows}
    assert "'student' width 9, the model expects 8" in reasons[("features-000000.tar", "000001")]
    assert "unreadable sample" in reasons[("features-000000.tar", "000002")]
    assert "unreadable tar data" in reasons[("features-000001.tar", "?")]
    assert loader.skipped == len(rows) == 3
    assert keys == {f"{i:06d}" for i in range(40)} - {"000001", "000002", "000007", "000008", "000009"}
