"""FLUX.2-klein end to end: cache features with its teacher contexts, train, resume (one process
and FSDP2 on 2 gloo ranks)."""

from __future__ import annotations

import pytest
import torch
from dopsd_data_tools.cache_features import CacheOptions, cache_features
from dopsd_data_tools.make_shards import ShardOptions, make_shards
from dopsd_data_tools.synthetic import make_synthetic_pairs

from dopsd_scale.config import ConfigError, load_config
from dopsd_scale.data.format import Manifest
from dopsd_scale.metrics import read_metrics
from dopsd_scale.trainer import Trainer

from .conftest import REPO
from .distributed.conftest import torchrun_train

CONFIG = REPO / "launch" / "configs" / "debug_flux2_klein.yaml"
KLEIN_BUCKETS = [(64, 64), (64, 96)]


@pytest.fixture(scope="module")
def klein_images(tmp_path_factory):
    """8 pairs, each with a `detailed` caption column, in 4 image shards of 64x64 / 64x96 buckets."""
    root = tmp_path_factory.mktemp("klein")
    pairs = make_synthetic_pairs(root / "pairs", count=8, seed=4)
    for txt in sorted(pairs.glob("*.txt")):
        (pairs / f"{txt.stem}.detailed.txt").write_text(f"a detailed photo: {txt.read_text().strip()}, studio light\n")
    make_shards(
        ShardOptions(str(pairs), str(root / "images"), shard_size=2, buckets=KLEIN_BUCKETS, min_side=16, processes=1)
    )
    return root / "images"


def _cache(images, out, models, **kw):
    cache_features(
        CacheOptions(
            input_dir=str(images), output_dir=str(out), pipeline=str(models["klein"]), latents=True, batch_size=4, **kw
        )
    )
    return out


@pytest.fixture(scope="module")
def klein_features(klein_images, debug_models, tmp_path_factory):
    return _cache(klein_images, tmp_path_factory.mktemp("kf") / "edit", debug_models)


def _config(run, models, features, *extra):
    return load_config(
        str(CONFIG),
        [
            f"model.path={models['klein']}",
            f"data.path={features}",
            f"run.output_dir={run}",
            "metrics.tensorboard=false",
            "run.deterministic=true",
            *extra,
        ],
    )


def test_edit_reference_features_hold_the_target_as_reference(klein_features):
    producer = Manifest.load(klein_features).producer
    assert producer["model"]["name"] == "flux2_klein" and producer["teacher_context"]["kind"] == "edit_reference"
    assert producer["student_encoder"]["max_length"] == 512 and producer["feature_dim"] == 96


def test_edit_reference_trains_and_resumes_bitwise(klein_features, debug_models, tmp_path):
    common = ["metrics.val_every=-1", "checkpoint.export_final=false"]
    Trainer(_config(tmp_path / "straight", debug_models, klein_features, "run.max_steps=4", *common)).fit()
    Trainer(_config(tmp_path / "resumed", debug_models, klein_features, "run.max_steps=2", *common)).fit()
    Trainer(_config(tmp_path / "resumed", debug_models, klein_features, "run.max_steps=4", *common)).fit()
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed")}
    assert sorted(b) == [1, 2, 3, 4] and all(a[s] == b[s] for s in (3, 4))
    assert all(torch.isfinite(torch.tensor(list(a.values()))))


def test_enhanced_prompt_on_klein(klein_images, debug_models, tmp_path):
    features = _cache(
        klein_images,
        tmp_path / "enhanced",
        debug_models,
        teacher_context="enhanced_prompt",
        teacher_caption_field="detailed",
    )
    trainer = Trainer(
        _config(
            tmp_path / "run",
            debug_models,
            features,
            "teacher.context=enhanced_prompt",
            "run.max_steps=2",
            "metrics.val_every=-1",
            "checkpoint.export_final=false",
        )
    )
    trainer.fit()
    assert trainer.step == 2
    with pytest.raises(ConfigError, match="teacher.context"):
        Trainer(_config(tmp_path / "wrong", debug_models, features))  # the config asks for edit_reference


def test_fsdp2_on_two_ranks_then_resume_on_one(klein_features, debug_models, tmp_path):
    run = tmp_path / "fsdp"
    overrides = [
        f"model.path={debug_models['klein']}",
        f"data.path={klein_features}",
        f"run.output_dir={run}",
        "metrics.tensorboard=false",
        "metrics.val_every=-1",
        "parallel.kind=fsdp2",
        "data.batch_size=1",
        "run.max_steps=2",
        "checkpoint.export_final=true",
    ]
    torchrun_train(2, overrides, config=CONFIG)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert (run / "export" / "model_index.json").is_file()
    trainer = Trainer(
        _config(
            tmp_path / "one",
            debug_models,
            klein_features,
            "run.max_steps=3",
            f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}",
            "metrics.val_every=-1",
            "checkpoint.export_final=false",
        )
    )
    trainer.fit()
    assert trainer.step == 3


def test_multi_reference_from_a_manifest_to_training(debug_models, tmp_path):
    """Reference columns of a manifest -> ref_<i> members -> edit_reference with the extra references
    (a sample without one is reported by the caching tool) -> batches of one reference count."""
    import json

    from dopsd_data_tools.synthetic import draw_pair

    rng, rows = __import__("random").Random(3), []
    for i in range(6):
        target, caption = draw_pair(rng)
        other, _ = draw_pair(rng)
        target.resize((64, 64)).save(tmp_path / f"t{i}.png")
        other.resize((64, 64)).save(tmp_path / f"o{i}.png")
        rows.append(
            {
                "image": f"t{i}.png",
                "text": caption,
                "ref": f"o{i}.png" if i < 5 else "",
                "ref2": "missing.png" if i == 0 else "",
            }
        )
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    summary = make_shards(
        ShardOptions(
            str(tmp_path / "pairs.jsonl"),
            str(tmp_path / "images"),
            shard_size=3,
            buckets=[(64, 64)],
            min_side=16,
            processes=1,
            reference_columns=["ref", "ref2"],
        )
    )
    assert summary["samples"] == 6
    report = (tmp_path / "images" / "report.jsonl").read_text()
    assert "reference image not found (column ref2)" in report
    features = _cache(tmp_path / "images", tmp_path / "features", debug_models, extra_references=True)
    cached = json.loads((features / "summary.json").read_text())
    assert cached["total_samples"] == 5 and "no extra reference image" in (features / "report.jsonl").read_text()
    trainer = Trainer(
        _config(
            tmp_path / "run",
            debug_models,
            features,
            "run.max_steps=1",
            "metrics.val_every=-1",
            "checkpoint.export_final=false",
            "data.shuffle_buffer=0",
        )
    )
    batch = next(trainer.loader)
    assert batch.teacher.ref_latents.shape[1] == 2  # the target and the extra reference
    trainer.fit()
