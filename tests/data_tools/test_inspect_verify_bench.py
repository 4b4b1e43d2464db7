"""inspect / verify / bench-data through the `dopsd` command, and what verify catches."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest
from dopsd_data_tools.cache_features import CacheOptions, cache_features
from dopsd_data_tools.inspect_shards import verify_shards
from dopsd_data_tools.make_shards import remove_from_shard

from dopsd_scale.cli import main


@pytest.fixture(scope="module")
def cached(image_shards, debug_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("cached") / "features"
    cache_features(
        CacheOptions(
            input_dir=str(image_shards),
            output_dir=str(out),
            pipeline=str(debug_models["pipeline"]),
            teacher_vlm=str(debug_models["teacher_vlm"]),
            vlm_min_pixels=32 * 32,
            vlm_max_pixels=64 * 64,
            batch_size=4,
        )
    )
    return out


def test_inspect_and_verify_commands(cached, image_shards, capsys):
    main(["inspect", str(image_shards)])
    text = capsys.readouterr().out
    assert "image-shards: 12 good sample(s) in 4 of 4 shard(s) (manifest: 12), 0 bad" in text
    assert "caption variants per sample: 1: 8, 2: 4" in text
    main(["inspect", str(cached / "features-{000000..000001}.tar"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "features" and info["samples"] == 6 and set(info["lengths"]) == {"student", "teacher"}
    main(["verify", str(cached), "--images", str(image_shards)])
    assert capsys.readouterr().out.strip() == "verify: ok"


def test_verify_names_what_does_not_line_up(cached, image_shards, tmp_path, capsys):
    feats = tmp_path / "features"
    shutil.copytree(cached, feats)
    remove_from_shard(feats / "features-000002.tar", {"000000007"})  # lost without a report row
    with tarfile.open(image_shards / "images-000002.tar") as tar:
        assert any(m.name.startswith("000000007.") for m in tar.getmembers())
    problems = verify_shards(str(feats), str(image_shards))
    assert "features-000002.tar: 2 good sample(s), the manifest says 3" in problems
    assert "images-000002.tar:000000007: no features and no report row in " + str(feats) in problems
    with pytest.raises(SystemExit, match="verify: 2 problem"):
        main(["verify", str(feats), "--images", str(image_shards)])
    capsys.readouterr()


def test_bench_data_prints_reader_and_caching_throughput(capsys):
    main(["bench-data", "--synthetic-samples", "24", "--dim", "64", "--cache-count", "6", "--repeats", "1"])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert names == [
        "raw read of the tar bytes, from disk",
        "reader (batch 4, 0 workers), from disk",
        "raw read of the tar bytes, from the page cache",
        "reader (batch 4, 0 workers), from the page cache",
        "cache-features, debug encoders, batch 1",
        "cache-features, debug encoders, batch 8",
    ]
    assert all(float(rows[i].split("|")[5]) > 0 for i in (2, 4))  # the reader/raw ratios
    assert all(float(r.split("|")[3].split()[0]) > 0 for r in rows[1:])  # samples/s (median, then spread)
