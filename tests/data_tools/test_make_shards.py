"""make-shards: every input layout, the shard format, resume, determinism across processes, buckets."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dopsd_data_tools.common import ManifestMismatch
from dopsd_data_tools.images import assign_bucket, make_buckets
from dopsd_data_tools.make_shards import make_shards
from dopsd_data_tools.synthetic import make_synthetic_pairs

from dopsd_scale.data.format import Manifest

from .conftest import pairs_with_variants, shard_options
from .test_bad_inputs import _shard_samples


def test_image_shards_hold_original_bytes_metadata_and_caption_variants(image_shards):
    manifest = Manifest.load(image_shards)
    assert manifest.kind == "image-shards" and manifest.num_samples == 12 and len(manifest.shards) == 4
    pairs = image_shards.parent / "pairs"
    samples = _shard_samples(image_shards)
    assert sorted(samples) == [f"{i:09d}" for i in range(12)]
    for key, s in samples.items():
        meta, data = s["json"], s["png"]
        source = pairs / meta["source_id"]
        assert data == source.read_bytes() and meta["sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["captions"][0] == source.with_suffix(".txt").read_text().strip()
        assert meta["caption_fields"] == (["caption", "tags"] if int(key) % 3 == 0 else ["caption"])
        assert meta["bucket"] == list(assign_bucket(meta["width"], meta["height"], manifest.producer["buckets"]))
    summary = json.loads((image_shards / "summary.json").read_text())
    assert sum(summary["buckets"].values()) == 12


def _table_inputs(tmp_path):
    """The same 5 pairs as JSONL, CSV and Parquet manifests."""
    make_synthetic_pairs(tmp_path / "img", count=5, seed=2)
    rows = [{"path": f"img/{i:06d}.png", "text": f"caption {i}", "tags": f"tag{i}"} for i in range(5)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "text", "tags"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    return rows


@pytest.mark.parametrize("name", ["m.jsonl", "m.csv", "m.parquet"])
def test_manifest_files(tmp_path, name):
    rows = _table_inputs(tmp_path)
    out = tmp_path / "out"
    summary = make_shards(shard_options(tmp_path / name, out, caption_columns=["text", "tags"]))
    assert summary["layout"] == "manifest" and summary["samples"] == 5
    got = {s["json"]["source_id"]: s["json"]["captions"] for s in _shard_samples(out).values()}
    assert got == {r["path"]: [r["text"], r["tags"]] for r in rows}


def test_hugging_face_dataset_saved_to_disk_and_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    pairs = make_synthetic_pairs(tmp_path / "pairs", count=5, seed=4)
    files = sorted(pairs.glob("*.png"))
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p in files], "text": [p.with_suffix(".txt").read_text().strip() for p in files]}
    )
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    summary = make_shards(shard_options(tmp_path / "hf", tmp_path / "out_hf"))
    assert summary["layout"] == "hf-disk" and summary["samples"] == 5
    got = sorted(s["png"] for s in _shard_samples(tmp_path / "out_hf").values())
    assert got == sorted(p.read_bytes() for p in files)  # the dataset's embedded bytes, unchanged

    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    for p in files:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "metadata.jsonl").write_text(
        "\n".join(
            json.dumps({"file_name": p.name, "text": p.with_suffix(".txt").read_text().strip()}) for p in files[:4]
        )
    )
    out = tmp_path / "out_if"
    summary = make_shards(shard_options(tmp_path / "imagefolder", out))
    assert summary["layout"] == "imagefolder" and summary["samples"] == 4
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in report] == [
        (f"train/{files[4].name}", "missing caption (no metadata row)")
    ]


def test_interrupted_run_resumes_and_processes_do_not_change_the_shards(tmp_path):
    pairs = pairs_with_variants(tmp_path / "pairs", count=10)
    one, two = tmp_path / "one", tmp_path / "two"
    make_shards(shard_options(pairs, one, processes=1))
    make_shards(shard_options(pairs, two, processes=2))
    assert _shard_samples(one) == _shard_samples(two)
    # a run killed after three of the four shards: the fourth is missing from the manifest
    manifest = Manifest.load(two)
    del manifest.shards["images-000003.tar"]
    manifest.save(two)
    (two / "images-000003.tar").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in two.glob("images-*.tar")}
    summary = make_shards(shard_options(pairs, two, processes=2))
    assert summary["shards_resumed"] == 3 and summary["samples"] == 10
    assert {p.name: p.stat().st_mtime_ns for p in two.glob("images-00000[012].tar")} == kept
    assert _shard_samples(one) == _shard_samples(two)
    (pairs / "extra.png").write_bytes((pairs / "000001.png").read_bytes())
    (pairs / "extra.txt").write_text("new pair")
    with pytest.raises(ManifestMismatch, match="listing_sha256"):
        make_shards(shard_options(pairs, two))


def test_shards_close_by_count_and_by_bytes(tmp_path):
    pairs = make_synthetic_pairs(tmp_path / "pairs", count=7, seed=1)
    make_shards(shard_options(pairs, tmp_path / "a", shard_size=3))
    assert list(Manifest.load(tmp_path / "a").shards.values()) == [3, 3, 1]
    biggest = max(p.stat().st_size for p in pairs.glob("*.png"))
    make_shards(shard_options(pairs, tmp_path / "b", shard_size=100, shard_bytes=2 * biggest))
    counts = list(Manifest.load(tmp_path / "b").shards.values())
    assert sum(counts) == 7 and max(counts) <= 2
    with tarfile.open(tmp_path / "b" / "images-000000.tar") as tar:
        assert len(tar.getmembers()) == 2 * counts[0]


def test_default_buckets_are_eleven_ratios_around_the_target_area():
    buckets = make_buckets(1024 * 1024)
    assert len(buckets) == 11
    for h, w in buckets:
        assert h % 32 == 0 and w % 32 == 0 and abs(h * w / 1024**2 - 1) < 0.06
    ratios = sorted(w / h for h, w in buckets)
    assert math.isclose(ratios[0], 0.5, rel_tol=0.05) and math.isclose(ratios[-1], 2.0, rel_tol=0.05)
    assert assign_bucket(1920, 1080, buckets) == (768, 1376)  # 16:9
    assert assign_bucket(1000, 1000, buckets) == (1024, 1024)


def test_make_shards_command_prints_its_summary(tmp_path, capsys):
    from dopsd_scale.cli import main

    pairs = pairs_with_variants(tmp_path / "pairs", count=6)
    (pairs / "000001.txt").unlink()
    main(
        [
            "make-shards",
            "--input",
            str(pairs),
            "--output",
            str(tmp_path / "out"),
            "--buckets",
            "32x32,32x48,48x32",
            "--min-side",
            "16",
            "--shard-size",
            "4",
            "--processes",
            "2",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("make-shards: 5 sample(s) in 2 shard(s) from 6 input(s) (folder)")
    assert "report: skipped 1 (missing caption file: 1)" in lines[0]
    assert lines[1].startswith("buckets: ")
