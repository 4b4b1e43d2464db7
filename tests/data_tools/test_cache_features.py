"""cache-features over image shards on a real 2-CPU local Ray cluster: actors, retries, resume, refusal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from dopsd_data_tools.cache_features import CacheOptions, cache_features
from dopsd_data_tools.common import ManifestMismatch
from dopsd_data_tools.inspect_shards import inspect_shards, verify_shards

from dopsd_scale.data.format import Manifest, pick_variant
from dopsd_scale.data.reader import build_loader

REPO = Path(__file__).resolve().parents[2]


def options(images: Path, out: Path, models: dict, **kw) -> CacheOptions:
    return CacheOptions(
        input_dir=str(images),
        output_dir=str(out),
        pipeline=str(models["pipeline"]),
        teacher_vlm=str(models["teacher_vlm"]),
        latents=True,
        vlm_min_pixels=32 * 32,
        vlm_max_pixels=64 * 64,
        batch_size=4,
        threads=1,
        **kw,
    )


def test_two_actors_cache_every_shard_and_every_caption_variant(local_ray, image_shards, debug_models, tmp_path):
    out = tmp_path / "features"
    summary = cache_features(options(image_shards, out, debug_models, actors=2))
    assert summary["samples_written"] == 12 and summary["total_samples"] == 12 and not summary["shards_failed"]
    manifest = Manifest.load(out)
    assert manifest.sources == {f"features-{i:06d}.tar": f"images-{i:06d}.tar" for i in range(4)}
    assert manifest.producer["input"]["kind"] == "image-shards"
    assert verify_shards(str(out), str(image_shards)) == []
    info = inspect_shards(str(out))
    assert info["samples"] == 12 and info["caption_variants"] == {"1": 8, "2": 4}
    assert sum(info["buckets"].values()) == 12 and info["lengths"]["student"]["min"] > 0
    loader = build_loader(str(out), batch_size=1, feature_dim=manifest.feature_dim, shuffle_buffer=0, seed=2)
    batches = [next(loader) for _ in range(12)]
    assert sorted(k for b in batches for k in b.keys) == [f"{i:09d}" for i in range(12)]
    assert (out / "val_prompts.safetensors").is_file() and (out / "report.jsonl").read_text() == ""
    assert pick_variant(2, 0, "000000000", 2) in (0, 1)


def _break_shard(path: Path) -> bytes:
    """Overwrite a shard from its second sample on; returns the original bytes."""
    original = path.read_bytes()
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[2].offset
    path.write_bytes(original[:cut] + b"\x07" * 1024)
    return original


def test_a_failing_shard_is_retried_then_reported_and_the_others_finish(
    local_ray, image_shards, debug_models, tmp_path
):
    images = tmp_path / "images"
    shutil.copytree(image_shards, images)
    original = _break_shard(images / "images-000001.tar")
    out = tmp_path / "features"
    summary = cache_features(options(images, out, debug_models, actors=2, retries=1))
    assert summary["shards_failed"] == ["features-000001.tar"]
    assert sorted(Manifest.load(out).shards) == ["features-000000.tar", "features-000002.tar", "features-000003.tar"]
    failed = [r for r in map(json.loads, (out / "report.jsonl").read_text().splitlines()) if r["action"] == "failed"]
    assert len(failed) == 1 and "images-000001.tar" in failed[0]["source"]
    assert failed[0]["reason"].startswith("shard failed after 2 tries (ShardReadError")
    (images / "images-000001.tar").write_bytes(original)  # repaired: the rerun caches only that shard
    again = cache_features(options(images, out, debug_models))
    assert again["shards_resumed"] == 3 and again["samples_written"] == 3 and again["total_samples"] == 12
    assert verify_shards(str(out), str(images)) == []


def test_a_killed_run_resumes_without_recomputing_finished_shards(local_ray, image_shards, debug_models, tmp_path):
    out = tmp_path / "features"
    # shard 2 of the input hangs (a slow object store), so the kill lands after shards 0 and 1
    slow = (
        f'pipe:sh -c \'case "$0" in *images-000002*) sleep 600;; esac; exec cat "$0"\' '
        f"{image_shards}/images-{{000000..000003}}.tar"
    )
    cmd = [
        sys.executable,
        "-m",
        "dopsd_scale.cli",
        "cache-features",
        "--input",
        slow,
        "--input-manifest",
        str(image_shards / "manifest.json"),
        "--output",
        str(out),
        "--pipeline",
        str(debug_models["pipeline"]),
        "--teacher-vlm",
        str(debug_models["teacher_vlm"]),
        "--latents",
        "--vlm-min-pixels",
        "1024",
        "--vlm-max-pixels",
        "4096",
        "--batch-size",
        "4",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "manifest.json").is_file() and len(Manifest.load(out).shards) == 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert len(Manifest.load(out).shards) == 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pipe, as a crash would
        proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("features-*.tar")}
    assert sorted(finished) == ["features-000000.tar", "features-000001.tar"]
    summary = cache_features(options(image_shards, out, debug_models, actors=2))
    assert summary["shards_resumed"] == 2 and summary["samples_written"] == 6 and summary["total_samples"] == 12
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # not recomputed
    assert verify_shards(str(out), str(image_shards)) == []
    with pytest.raises(ManifestMismatch, match=r"differs in: latents\); use another output directory"):
        cache_features(replace(options(image_shards, out, debug_models), latents=False))
