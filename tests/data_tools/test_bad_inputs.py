"""Every kind of bad input: skipped or converted as documented, counted, reported with key and reason."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from dopsd_data_tools.images import load_rgb
from dopsd_data_tools.make_shards import make_shards
from dopsd_data_tools.synthetic import make_synthetic_pairs
from PIL import Image

from .conftest import encode, shard_options


def _shard_samples(out) -> dict[str, dict]:
    """key -> {"json": meta, ext: bytes} over all image shards."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("images-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return samples


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """8 good pairs plus one input of every bad kind (the file name says which)."""
    pairs = make_synthetic_pairs(tmp_path_factory.mktemp("bad") / "pairs", count=8, seed=3)
    rgb = Image.new("RGB", (40, 30), (200, 10, 10))
    jpeg = encode(rgb, "JPEG")
    files = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "zero.png": b"",
        "alpha.png": encode(Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG"),
        "deep16.png": encode(Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        "panorama.png": encode(Image.new("RGB", (200, 20)), "PNG"),
        "tiny.png": encode(Image.new("RGB", (8, 8)), "PNG"),
        "nocaption.png": encode(rgb, "PNG"),
        "latin1.png": encode(Image.new("RGB", (36, 36), (1, 2, 3)), "PNG"),
        "zzz_duplicate.png": (pairs / "000002.png").read_bytes(),
    }
    for name, data in files.items():
        (pairs / name).write_bytes(data)
        if name != "nocaption.png":
            (pairs / name).with_suffix(".txt").write_bytes(f"caption of {name}".encode())
    (pairs / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    return pairs


def test_make_shards_skips_converts_counts_and_reports_every_bad_input(bad_folder, tmp_path):
    out = tmp_path / "shards"
    summary = make_shards(shard_options(bad_folder, out, shard_size=4))
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    by_source = {}
    for row in report:
        by_source.setdefault(row.get("source"), []).append((row["action"], row["reason"]))
    expected = {
        "truncated.jpg": ("skipped", "unreadable image"),
        "zero.png": ("skipped", "empty file"),
        "panorama.png": ("skipped", "extreme aspect ratio"),
        "tiny.png": ("skipped", "below minimum size"),
        "nocaption.png": ("skipped", "missing caption file"),
        "latin1.png": ("skipped", "caption is not UTF-8"),
        "zzz_duplicate.png": ("skipped", "duplicate (same sha256 as"),
        "alpha.png": ("converted", "alpha composited on white"),
        "deep16.png": ("converted", "I;16 scaled to 8 bits"),
        "cmyk.jpg": ("converted", "CMYK converted to RGB"),
    }
    for source, (action, reason) in expected.items():
        assert [(a, r) for a, r in by_source[source] if r.startswith(reason)] and all(
            a == action for a, _ in by_source[source]
        ), (source, by_source.get(source))
    assert all(len(row["key"]) == 9 for row in report)  # every row names its sample key
    assert summary["skipped"] == 7 and summary["converted"] == 3
    assert summary["reasons"]["skipped"]["duplicate"] == 1
    samples = _shard_samples(out)
    kept_sources = {s["json"]["source_id"] for s in samples.values()}
    good = {f"{i:06d}.png" for i in range(8)} | {"alpha.png", "deep16.png", "cmyk.jpg"}
    assert kept_sources == good and summary["samples"] == len(good)  # every good sample is there


def test_converted_images_keep_their_bytes_and_load_as_documented(bad_folder, tmp_path):
    out = tmp_path / "shards"
    make_shards(shard_options(bad_folder, out, shard_size=4))
    by_source = {s["json"]["source_id"]: s for s in _shard_samples(out).values()}
    for source, ext in (("alpha.png", "png"), ("deep16.png", "png"), ("cmyk.jpg", "jpg")):
        assert by_source[source][ext] == (bad_folder / source).read_bytes()  # never re-encoded
    assert load_rgb(by_source["alpha.png"]["png"]).getpixel((3, 3)) == (255, 255, 255)
    deep = np.asarray(load_rgb(by_source["deep16.png"]["png"]))
    assert deep.dtype == np.uint8 and 0 < deep.max() <= 255 and deep.min() < 10 and len(np.unique(deep)) > 50
    r, g, b = load_rgb(by_source["cmyk.jpg"]["jpg"]).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60
    meta = by_source["deep16.png"]["json"]
    assert meta["mode"] == "I;16" and meta["conversions"] == ["I;16 scaled to 8 bits"]


def test_manifest_rows_with_missing_files_or_captions_are_reported(tmp_path):
    make_synthetic_pairs(tmp_path / "pairs", count=4, seed=1)
    lines = [
        json.dumps({"image": f"pairs/{i:06d}.png", "caption": f"c{i}", "tags": f"t{i}"}).encode() for i in range(4)
    ]
    lines += [
        json.dumps({"image": "pairs/gone.png", "caption": "x", "tags": "y"}).encode(),
        json.dumps({"image": "pairs/000001.png", "caption": None, "tags": None}).encode(),
        b'{"image": "pairs/000002.png", "caption": "caf\xe9"}',
        b"{not json",
    ]
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join(lines))
    out = tmp_path / "shards"
    summary = make_shards(shard_options(tmp_path / "rows.jsonl", out, caption_columns=["caption", "tags"]))
    reasons = {
        r["key"]: r["reason"] for r in json.loads(f"[{','.join((out / 'report.jsonl').read_text().splitlines())}]")
    }
    assert reasons["000000004"].startswith("image file not found") and "gone.png" in reasons["000000004"]
    assert reasons["000000005"].startswith("missing caption")
    assert reasons["000000006"].startswith("caption is not UTF-8")
    assert reasons["000000007"].startswith("malformed manifest row")
    assert summary["samples"] == 4 and summary["skipped"] == 4
    assert {tuple(s["json"]["captions"]) for s in _shard_samples(out).values()} == {
        (f"c{i}", f"t{i}") for i in range(4)
    }


def test_a_malformed_jsonl_manifest_is_one_line_naming_file_and_line(tmp_path, capsys):
    from dopsd_scale.cli import main

    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps([{"image": "a.png", "text": "x"}], indent=2), encoding="utf-8")  # JSON, not JSONL
    assert main(["make-shards", "--input", str(manifest), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(manifest) in err and "line 1" in err and "JSON Lines" in err
