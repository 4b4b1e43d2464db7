"""Feature shards: format round trip, the caching tool's resume and refusals, the reader's guarantees."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dopsd_data_tools.cache_features import ManifestMismatch, cache_features
from dopsd_data_tools.images import assign_bucket
from dopsd_data_tools.synthetic import make_synthetic_pairs

from dopsd_scale.data.format import FeatureSample, Manifest, decode_sample, encode_sample, load_val_prompts
from dopsd_scale.data.reader import build_loader

from .conftest import DEBUG_BUCKETS, debug_cache_options

DIM = 32


def test_sample_round_trip_has_no_pickle():
    sample = FeatureSample(
        "k1",
        {"caption": "ü", "bucket": [32, 48]},
        {"student": torch.randn(5, DIM), "teacher": torch.randn(9, DIM), "latents": torch.randn(4, 16, 24)},
    )
    raw = encode_sample(sample, torch.float32)
    assert set(raw) == {"__key__", "json", "safetensors"}
    back = decode_sample(raw)
    assert back.bucket == (32, 48) and back.meta["caption"] == "ü"
    for k, v in sample.tensors.items():
        assert torch.equal(back.tensors[k], v)


def test_cached_directory_layout(features):
    manifest = Manifest.load(features)
    assert manifest.num_samples == 16 and len(manifest.shards) == 4
    assert manifest.feature_dim == DIM
    assert manifest.producer["teacher_context"]["kind"] == "vlm"
    assert all(len(h) == 64 for h in manifest.producer["student_encoder"]["hashes"].values())
    prompts, feats = load_val_prompts(features / "val_prompts.safetensors")
    assert len(prompts) == len(feats) == 4 and feats[0].shape[1] == DIM


def _all_batches(loader, n):
    return [(tuple(b.keys), b.bucket) for b in (next(loader) for _ in range(n))]


def test_batches_are_bucket_homogeneous_and_cover_the_epoch(features):
    loader = build_loader(str(features), batch_size=1, feature_dim=DIM, shuffle_buffer=4, seed=1)
    singles = _all_batches(loader, 16)
    assert len({keys[0] for keys, _ in singles}) == 16  # batch size 1: an epoch is every sample once
    bucket_of = {keys[0]: bucket for keys, bucket in singles}
    loader = build_loader(str(features), batch_size=2, feature_dim=DIM, shuffle_buffer=4, seed=1)
    for _ in range(10):
        batch = next(loader)
        assert {bucket_of[k] for k in batch.keys} == {batch.bucket} and len(batch) == 2
        assert batch.latents.shape[-2:] == (batch.bucket[0] // 2, batch.bucket[1] // 2)
        assert batch.student.mask.sum(1).min() > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_reader_yields_the_identical_remaining_batches(features, workers):
    kw = dict(batch_size=2, feature_dim=DIM, num_workers=workers, shuffle_buffer=4, seed=3)
    straight = _all_batches(build_loader(str(features), **kw), 14)
    first = build_loader(str(features), **kw)
    _all_batches(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive JSON
    resumed = build_loader(str(features), **kw)
    resumed.load_state_dict(state)
    assert _all_batches(resumed, 9) == straight[5:]


def test_ranks_split_the_shards(features):
    seen = []
    for rank in range(2):
        loader = build_loader(str(features), batch_size=1, feature_dim=DIM, shuffle_buffer=0, rank=rank, world_size=2)
        seen.append({b[0][0] for b in _all_batches(loader, 8)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16


def _corrupt_copy(features: Path, tmp_path: Path) -> Path:
    """A copy of the shards where one sample's safetensors member is garbage."""
    out = tmp_path / "corrupt"
    shutil.copytree(features, out)
    shard = sorted(out.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            if i == 1:  # the first sample's tensors
                data = b"not a safetensors blob"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return out


def test_corrupt_sample_is_skipped_and_the_rest_is_read(features, tmp_path, caplog):
    data = _corrupt_copy(features, tmp_path)
    loader = build_loader(str(data), batch_size=1, feature_dim=DIM, shuffle_buffer=0)
    keys = {b[0][0] for b in _all_batches(loader, 15)}
    assert len(keys) == 15
    assert any("unreadable sample" in r.message for r in caplog.records)


def test_wrong_feature_width_is_refused(features):
    with pytest.raises(ValueError, match="64"):
        build_loader(str(features), batch_size=1, feature_dim=64)


def test_caching_resumes_and_refuses_a_different_producer(tmp_path, debug_models, features):
    pairs = make_synthetic_pairs(tmp_path / "pairs", count=8, seed=5)
    out = tmp_path / "features"
    first = cache_features(debug_cache_options(pairs, out, debug_models))
    assert first["samples_written"] == 8
    # simulate a run killed while writing the second shard
    manifest = Manifest.load(out)
    del manifest.shards["features-000001.tar"]
    manifest.save(out)
    (out / "features-000001.tar").rename(out / "features-000001.tar.tmp")
    kept = (out / "features-000000.tar").stat().st_mtime_ns
    second = cache_features(debug_cache_options(pairs, out, debug_models))
    assert second["shards_resumed"] == 1 and second["samples_written"] == 4
    assert (out / "features-000000.tar").stat().st_mtime_ns == kept
    assert Manifest.load(out).num_samples == 8
    with pytest.raises(ManifestMismatch, match="buckets"):
        cache_features(replace(debug_cache_options(pairs, out, debug_models), buckets=[(64, 64)]))


def test_bad_inputs_are_reported_not_fatal(tmp_path, debug_models):
    pairs = make_synthetic_pairs(tmp_path / "pairs", count=4, seed=1)
    (pairs / "000001.txt").unlink()  # missing caption
    (pairs / "000002.txt").write_bytes(b"\xff\xfe caption")  # not UTF-8
    (pairs / "000003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # unreadable image
    out = tmp_path / "features"
    summary = cache_features(debug_cache_options(pairs, out, debug_models))
    assert summary["samples_written"] == 1 and summary["skipped"] == 3
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    reasons = {r["key"]: r["reason"] for r in report}
    assert reasons["000001"] == "missing caption file"
    assert reasons["000002"] == "caption is not UTF-8"
    assert reasons["000003"].startswith("unreadable image")


def test_bucket_assignment():
    assert assign_bucket(48, 32, DEBUG_BUCKETS) == (32, 48)
    assert assign_bucket(32, 48, DEBUG_BUCKETS) == (48, 32)
    assert assign_bucket(100, 90, DEBUG_BUCKETS) == (32, 32)
