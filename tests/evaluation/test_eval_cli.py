"""`dopsd precheck` and `dopsd eval` end to end on the debug assets (CPU), resume after an interrupted
generation, one-line errors naming the flag, and the validation grid with the teacher beside the student."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from PIL import Image

from dopsd_scale.cli import main
from dopsd_scale.evaluation import generate
from dopsd_scale.evaluation.run import EvalOptions, evaluate

from .conftest import CONCEPT, FAST, GENERAL


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_precheck_prints_a_verdict_and_writes_the_grid(tmp_path, debug_models, features, tiny_encoders, capsys):
    out = tmp_path / "precheck"
    code = main(
        [
            "precheck",
            "--model",
            str(debug_models["pipeline"]),
            "--data",
            str(features),
            "--out",
            str(out),
            "--encoder",
            str(tiny_encoders["dino"]),
            "--samples",
            "6",
            "--steps",
            "2",
            "--batch-size",
            "4",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "verdict (DINOv2 1-cos" in printed and any(v in printed for v in ("GOOD", "WEAK", "BAD"))
    results = json.loads((out / "precheck.json").read_text())
    assert results["samples"] == 6 and set(results["measures"]) == {"latent MSE", "pixel MSE", "DINOv2 1-cos"}
    for m in results["measures"].values():
        assert m["n"] == 6 and all(v >= 0 for v in m["per_sample"]["student"] + m["per_sample"]["teacher"])
    with Image.open(out / "precheck_grid.png") as grid:
        assert grid.width == 3 * 32 and grid.height == 6 * 32  # target | student | teacher, one row per sample


def test_precheck_needs_latents_and_existing_weights(tmp_path, debug_models, features, capsys):
    from ..conftest import write_feature_shards

    bare = write_feature_shards(tmp_path / "bare", num_shards=1, per_shard=2, dim=32)
    args = ["precheck", "--model", str(debug_models["pipeline"]), "--out", str(tmp_path / "o")]
    assert main(args + ["--data", str(bare)]) == 2
    assert "--latents" in _error_line(capsys)
    assert main(args + ["--data", str(features), "--encoder", str(tmp_path / "nowhere")]) == 2
    assert _error_line(capsys).startswith(f"dopsd precheck: error: --encoder {tmp_path / 'nowhere'}: no such directory")


def test_eval_end_to_end_writes_report_and_results(
    tmp_path, debug_models, tuned_export, base_checkpoint, prompt_files, tiny_encoders, capsys
):
    from dopsd_data_tools.synthetic import make_synthetic_pairs

    pairs = make_synthetic_pairs(tmp_path / "pairs", count=6, seed=1)  # targets and domain reference
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--base",
            str(debug_models["pipeline"]),
            "--tuned",
            str(tuned_export),
            "--tuned",
            f"unmoved={base_checkpoint}",
            "--out",
            str(out),
            "--concept-prompts",
            str(prompt_files["concept"]),
            "--general-prompts",
            str(prompt_files["general"]),
            "--targets",
            str(pairs),
            "--reference",
            str(pairs),
            "--clip",
            str(tiny_encoders["clip"]),
            "--dino",
            str(tiny_encoders["dino"]),
            "--placeholder",
            "sks=shape",
            "--seeds",
            "0,1",
            "--batch-size",
            "2",
            "--kid-subsets",
            "5",
            "--quality-size",
            "32",
            *FAST,
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "report:" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    tuned = tuned_export.parent.name  # an export inside a run directory is named after the run
    assert list(results["models"]) == ["base", tuned, "unmoved"]
    assert results["generation"] == {"generated": 3 * 2 * (len(CONCEPT) + len(GENERAL)), "cached": 0}
    concept, general = results["metrics"]["concept"], results["metrics"]["general"]
    for key in (
        "clip_score",
        "fidelity_DINOv2",
        "fidelity_CLIP",
        "FD_DINOv2",
        "KID_DINOv2",
        "sharpness",
        "colour_swd",
        "delta_clip_score",
    ):
        assert key in concept, key
    assert concept["FD_DINOv2"]["base"]["n"] == 2 and len(concept["FD_DINOv2"]["base"]["per_seed"]) == 2
    # a checkpoint holding the base's own weights reproduces the base's images from the same noise
    assert general["retention_DINOv2"]["unmoved"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert general["retention_psnr"]["unmoved"]["mean"] == 100.0
    assert general["retention_DINOv2"][tuned]["mean"] > 1e-4 and general["retention_psnr"][tuned]["mean"] < 60
    assert concept["delta_clip_score"]["unmoved"]["mean"] == 0.0
    html = (out / "report.html").read_text()
    assert html.count("<svg") == len(concept) + len(general)
    assert html.count("<img") >= 3 * (len(CONCEPT) + len(GENERAL))  # every prompt: base | export | unmoved
    assert (out / "grids" / "concept_seed0.png").is_file() and (out / "grids" / "general_seed0.png").is_file()


def test_an_interrupted_eval_resumes_with_only_the_rest(tmp_path, debug_models, prompt_files, monkeypatch):
    opts = EvalOptions(
        base=str(debug_models["pipeline"]),
        out=str(tmp_path / "eval"),
        seeds=[0, 1],
        concept_prompts=str(prompt_files["concept"]),
        batch_size=2,
        height=32,
        width=32,
        steps=2,
        quality_size=32,
        kid_subsets=5,
    )
    real_save, saved = generate.save_png, []

    def crash_after_four(image, path):
        if len(saved) == 4:
            raise RuntimeError("simulated crash")
        real_save(image, path)
        saved.append(path)

    monkeypatch.setattr(generate, "save_png", crash_after_four)
    with pytest.raises(RuntimeError, match="rerun to continue"):
        evaluate(opts)
    on_disk = sorted((tmp_path / "eval" / "images").rglob("*.png"))
    assert on_disk == sorted(saved) and len(on_disk) == 4
    before = {p: p.stat().st_mtime_ns for p in on_disk}
    monkeypatch.setattr(generate, "save_png", real_save)
    results = evaluate(opts)
    assert results["generation"] == {"generated": 2 * len(CONCEPT) - 4, "cached": 4}
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing regenerated
    assert evaluate(opts)["generation"] == {"generated": 0, "cached": 2 * len(CONCEPT)}
    # other settings under the same --out are refused, not mixed
    with pytest.raises(Exception, match="came from other settings"):
        evaluate(EvalOptions(**{**opts.__dict__, "steps": 3}))


def test_eval_errors_are_one_line_naming_the_flag(tmp_path, debug_models, prompt_files, capsys):
    args = [
        "eval",
        "--base",
        str(debug_models["pipeline"]),
        "--out",
        str(tmp_path / "o"),
        "--general-prompts",
        str(prompt_files["general"]),
    ]
    for flag in ("--clip", "--dino"):
        assert main(args + [flag, str(tmp_path / "weights")]) == 2
        assert _error_line(capsys).startswith(f"dopsd eval: error: {flag} {tmp_path / 'weights'}: no such directory")
    assert main(args + ["--fd-encoder", "dino"]) == 2
    assert "--fd-encoder dino needs --dino" in _error_line(capsys)
    assert main(args + ["--tuned", str(tmp_path)]) == 2
    assert "--tuned" in _error_line(capsys)
    assert main(["eval", "--base", str(debug_models["pipeline"]), "--out", str(tmp_path / "o")]) == 2
    assert "--concept-prompts" in _error_line(capsys)
    assert not (tmp_path / "o" / "images").exists()  # nothing generated before the inputs were checked


def test_validation_grid_shows_the_teacher_beside_the_student_and_goes_to_tensorboard(
    tmp_path, make_config, features, debug_models
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dopsd_scale.data.format import Manifest
    from dopsd_scale.metrics import MetricsLogger
    from dopsd_scale.models import get_spec
    from dopsd_scale.validation import read_pairs, run_validation

    cfg = make_config("metrics.val_steps=2")
    spec = get_spec("zimage", debug_models["pipeline"])
    model = spec.load_transformer()
    pairs = read_pairs(str(features), count=3)
    assert len(pairs) == 3 and pairs.latents is not None
    assert read_pairs(str(features), count=3).keys == pairs.keys  # the same samples every time
    logger = MetricsLogger(tmp_path / "run", tensorboard=True)
    path = run_validation(
        spec,
        model,
        cfg,
        Manifest.load(features),
        torch.device("cpu"),
        contextlib.nullcontext(),
        5,
        tmp_path / "run",
        True,
        pairs=pairs,
        logger=logger,
    )
    logger.close()
    assert path == tmp_path / "run" / "validation" / "step_00000005.png"
    h, w = pairs.bucket
    with Image.open(tmp_path / "run" / "validation" / "student_teacher" / "step_00000005.png") as grid:
        assert grid.size == (3 * w, 3 * h)  # target | student | teacher
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["images"]) == {"validation/student", "validation/target_student_teacher"}
