"""Teacher contexts at caching time: what each one stores, what the manifest records, what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dopsd_data_tools.cache_features import CacheOptions, cache_features
from dopsd_data_tools.encode_shard import ShardEncoder
from dopsd_data_tools.images import fit_to_bucket
from dopsd_data_tools.make_shards import make_shards
from PIL import Image
from transformers import AutoTokenizer

from dopsd_scale.contexts import ContextError
from dopsd_scale.data.format import Manifest, decode_sample
from dopsd_scale.data.shards import iter_tar_samples
from dopsd_scale.encoders.debug import build_debug_image_processor

from ..test_encoders import real_pair_vlm
from .conftest import shard_options


def _options(images: Path, out: Path, models: dict, **kw) -> CacheOptions:
    base = dict(
        input_dir=str(images),
        output_dir=str(out),
        pipeline=str(models["pipeline"]),
        teacher_vlm=str(models["teacher_vlm"]),
        vlm_min_pixels=32 * 32,
        vlm_max_pixels=64 * 64,
        batch_size=4,
    )
    return CacheOptions(**{**base, **kw})


def _samples(out: Path) -> list:
    return [
        decode_sample(raw)
        for shard in sorted(out.glob("features-*.tar"))
        for raw in iter_tar_samples(str(shard), lambda err: None)
    ]


@pytest.fixture(scope="module")
def wide_image_shards(tmp_path_factory) -> Path:
    """Two pairs of 64x32 images (2:1) whose bucket is 32x32: the crop cuts off their sides, which
    are red while the centre is blue; each has a `detailed` caption column."""
    root = tmp_path_factory.mktemp("wide")
    rows = []
    for i in range(2):
        img = Image.new("RGB", (64, 32), (230, 20, 20))
        img.paste((20, 20 + i, 230), (16, 0, 48, 32))  # not identical: make-shards drops duplicates
        img.save(root / f"w{i}.png")
        rows.append({"image": f"w{i}.png", "text": f"a blue square {i}", "detailed": f"a detailed caption {i}"})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    make_shards(
        shard_options(root / "pairs.jsonl", root / "shards", buckets=[(32, 32)], caption_columns=["text", "detailed"])
    )
    return root / "shards"


def test_the_vlm_teacher_sees_the_bucket_crop(wide_image_shards, debug_models, tmp_path, monkeypatch):
    """The teacher sees exactly the pixels of the target latents, not the uncropped original."""
    opts = _options(
        wide_image_shards, tmp_path / "f", debug_models, model_name="zimage", teacher_context="vlm", latents=True
    )
    encoder = ShardEncoder({**vars(opts), "buckets": [[32, 32]], "teacher_context": "vlm"})
    seen = []
    encode = encoder.context.vlm.encode
    monkeypatch.setattr(
        encoder.context.vlm, "encode", lambda images, prompts: seen.extend(images) or encode(images, prompts)
    )
    (tmp_path / "f").mkdir()
    shard = sorted(wide_image_shards.glob("images-*.tar"))[0]
    encoder.run({"name": "features-000000.tar", "source": str(shard)})
    assert seen and all(im.size == (32, 32) for im in seen)
    original = Image.open(sorted(wide_image_shards.parent.glob("w*.png"))[0]).convert("RGB")
    assert list(seen[0].getdata()) == list(fit_to_bucket(original, (32, 32)).getdata())
    assert seen[0].getpixel((0, 16))[2] > 200  # the blue centre, not the red side


def test_cache_features_with_the_real_pairs_positional_fields_records_the_graft(image_shards, debug_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(debug_models["teacher_vlm"]))
    vlm_dir = tmp_path / "vlm"
    real_pair_vlm(tok).save_pretrained(str(vlm_dir))
    tok.save_pretrained(str(vlm_dir))
    build_debug_image_processor().save_pretrained(str(vlm_dir))
    for positions in ("vlm", "text"):
        out = tmp_path / f"features_{positions}"
        cache_features(_options(image_shards, out, debug_models, teacher_vlm=str(vlm_dir), vlm_positions=positions))
        record = Manifest.load(out).producer["teacher_context"]
        assert record["kind"] == "vlm" and record["positions"] == positions
        assert record["graft"]["differences"]["rope.rope_theta"] == [1_000_000.0, 5_000_000.0]
        assert record["image_processor"] == "pil"


def test_enhanced_prompt_reads_its_column_and_hides_it_from_the_student(wide_image_shards, debug_models, tmp_path):
    out = tmp_path / "enhanced"
    cache_features(
        _options(
            wide_image_shards, out, debug_models, teacher_context="enhanced_prompt", teacher_caption_field="detailed"
        )
    )
    producer = Manifest.load(out).producer
    assert producer["teacher_context"] == {"kind": "enhanced_prompt", "caption_field": "detailed"}
    samples = _samples(out)
    assert len(samples) == 2
    for s in samples:
        assert s.meta["captions"] == [s.meta["caption"]] and s.meta["caption"].startswith("a blue square")
        assert s.num_variants == 1 and not torch.equal(s.tensors["student"][:5], s.tensors["teacher"][:5])


def test_prompt_only_anchor_set_from_a_text_file(debug_models, tmp_path):
    prompts = tmp_path / "anchors.txt"
    prompts.write_text("a red circle\n\na green square on a white background\nan orange triangle\n", encoding="utf-8")
    out = tmp_path / "anchors"
    summary = cache_features(
        CacheOptions(
            input_dir=str(prompts),
            output_dir=str(out),
            pipeline=str(debug_models["pipeline"]),
            prompts_only=True,
            buckets=[(32, 32), (32, 48)],
            latents=True,
        )
    )
    producer = Manifest.load(out).producer
    assert producer["teacher_context"] == {"kind": "prompt"} and producer["latents"] is False
    assert producer["input"]["kind"] == "prompts" and summary["total_samples"] == 3
    samples = _samples(out)
    assert [s.bucket for s in samples] == [(32, 32), (32, 48), (32, 32)]
    assert all(torch.equal(s.tensors["student"], s.tensors["teacher"]) for s in samples)
    with pytest.raises(ValueError, match="prompt"):
        cache_features(
            CacheOptions(
                input_dir=str(prompts),
                output_dir=str(tmp_path / "x"),
                pipeline=str(debug_models["pipeline"]),
                prompts_only=True,
                teacher_context="vlm",
            )
        )


def test_a_context_missing_its_option_stops_before_any_model_loads(image_shards, debug_models, tmp_path):
    with pytest.raises(ContextError, match="--teacher-vlm"):
        cache_features(_options(image_shards, tmp_path / "a", debug_models, teacher_vlm=None))
    with pytest.raises(ContextError, match="--teacher-caption-field"):
        cache_features(_options(image_shards, tmp_path / "b", debug_models, teacher_context="enhanced_prompt"))
    with pytest.raises(ContextError, match="unknown teacher context"):
        cache_features(_options(image_shards, tmp_path / "c", debug_models, teacher_context="nope"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_enhanced_prompt_reports_samples_without_the_column(image_shards, debug_models, tmp_path):
    """The debug shards' `tags` column exists for some samples only: the others are reported, not lost."""
    out = tmp_path / "tags"
    summary = cache_features(
        _options(image_shards, out, debug_models, teacher_context="enhanced_prompt", teacher_caption_field="tags")
    )
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert summary["total_samples"] == 4 and len(report) == 8
    assert all("no 'tags' caption" in r["reason"] for r in report)
