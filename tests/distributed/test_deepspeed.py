"""DeepSpeed ZeRO-2/3 on 2 CPU ranks (gloo, torchrun): same losses as one process, exact resume, export.

All runs here (one process and DeepSpeed) share two settings that make the comparison sharper:
- `teacher.ema_decay=0.5`, so the teacher moves visibly each step and a stale or wrongly updated
  (sharded) teacher shows in the losses of the following steps (a ZeRO-3 teacher that kept its
  gathered weights between forwards puts step 3's loss 2% off);
- a `nan` fault in the 2nd optimizer step: its update is skipped, which checks that `zero_grad`
  really drops DeepSpeed's pending gradient partitions (under ZeRO-3 stale ones are added to the
  next step's and change its grad norm and the following loss), while the LR schedule moves on.
The LR warm-up (5 steps in the debug config) changes the LR every step, so matching losses also
show that the trainer's schedule drives what DeepSpeed's optimizer applies.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from safetensors.torch import load_file

from dopsd_scale.checkpoint import load_student_weights
from dopsd_scale.config import load_config
from dopsd_scale.metrics import read_metrics
from dopsd_scale.trainer import Trainer

from ..conftest import DEBUG_CONFIG, run_dopsd
from .conftest import dist_env, torchrun_train, train_overrides, train_single

STEPS = 4
SKIPPED = 2  # the logged step whose update the nan fault skips
# fp32 everywhere; only the order of reductions differs between the runs
LOSS_RTOL = 1e-4
SHARED = ["teacher.ema_decay=0.5", "run.fault.kind=nan", "run.fault.rank=0", f"run.fault.step={SKIPPED}"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, debug_models, uniform_features):
    run = tmp_path_factory.mktemp("single") / "run"
    return train_single(run, debug_models, uniform_features, *SHARED, f"run.max_steps={STEPS}")


def _zero_run(tmp_path_factory, debug_models, features, stage: int, *extra: str):
    run = tmp_path_factory.mktemp(f"zero{stage}") / "run"
    torchrun_train(
        2,
        train_overrides(
            debug_models,
            features,
            run,
            *SHARED,
            "parallel.kind=deepspeed",
            f"parallel.zero_stage={stage}",
            "data.batch_size=1",
            f"run.max_steps={STEPS}",
            *extra,
        ),
    )
    return run


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, debug_models, uniform_features):
    return _zero_run(tmp_path_factory, debug_models, uniform_features, 2, "checkpoint.every_steps=2")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, debug_models, uniform_features):
    return _zero_run(tmp_path_factory, debug_models, uniform_features, 3, "checkpoint.every_steps=2")


@pytest.fixture(params=[2, 3], ids=["zero2", "zero3"])
def zero_run(request):
    return request.getfixturevalue(f"zero{request.param}_run")


def _metric(run, key):
    return {r["step"]: r[key] for r in read_metrics(run)}


def _assert_matches_single_process(single_run, sharded_run):
    for key in ("loss", "grad_norm", "lr"):
        single, sharded = _metric(single_run, key), _metric(sharded_run, key)
        assert sorted(sharded) == list(range(1, STEPS + 1))
        for step in single:
            if key == "loss" and step == SKIPPED:
                assert math.isnan(sharded[step]) and math.isnan(single[step])
                continue
            assert math.isfinite(sharded[step]), (key, step)
            assert sharded[step] == pytest.approx(single[step], rel=LOSS_RTOL), (key, step)
    assert _metric(sharded_run, "skipped_nonfinite")[STEPS] == 1


def test_zero_matches_single_process(single_run, zero_run):
    _assert_matches_single_process(single_run, zero_run)
    losses = _metric(single_run, "loss")
    assert losses[STEPS] < losses[1]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_and_deferred_sync_match_single_process(
    single_run, stage, tmp_path_factory, debug_models, uniform_features
):
    """CPU offload (optimizer; parameters too for ZeRO-3) and one gradient reduction per step."""
    run = _zero_run(
        tmp_path_factory,
        debug_models,
        uniform_features,
        stage,
        "parallel.cpu_offload=true",
        "parallel.defer_grad_sync=true",
        "checkpoint.save_final=false",
        "checkpoint.export_final=false",
    )
    _assert_matches_single_process(single_run, run)


def test_zero_teacher_is_the_ema_of_one_process(single_run, zero_run, debug_models):
    """The sharded EMA (shard by shard; saved per rank under ZeRO-3) equals the one-process EMA."""
    reference = {}
    for which in ("student", "teacher"):
        model = ZImageTransformer2DModel.from_pretrained(str(debug_models["pipeline"] / "transformer"))
        load_student_weights(model, single_run / "checkpoints", which=which)
        reference[which] = model.state_dict()
        model = ZImageTransformer2DModel.from_pretrained(str(debug_models["pipeline"] / "transformer"))
        load_student_weights(model, zero_run / "checkpoints", which=which)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, reference[which][name], rtol=1e-4, atol=1e-6, msg=f"{which} {name}")
    # the teacher lags the student, so the teacher comparison above is not the student's again
    assert any(not torch.equal(reference["teacher"][k], reference["student"][k]) for k in reference["student"])


def test_zero3_checkpoint_resumes_exactly(zero3_run, debug_models, uniform_features, tmp_path):
    resumed = tmp_path / "resumed"
    torchrun_train(
        2,
        train_overrides(
            debug_models,
            uniform_features,
            resumed,
            *SHARED,
            "parallel.kind=deepspeed",
            "parallel.zero_stage=3",
            "data.batch_size=1",
            f"run.max_steps={STEPS}",
            f"checkpoint.resume={zero3_run / 'checkpoints' / 'step_00000002'}",
            "checkpoint.export_final=false",
        ),
    )
    again, first = _metric(resumed, "loss"), _metric(zero3_run, "loss")
    assert sorted(again) == [3, 4]
    for step in again:  # bit for bit: same world size, DeepSpeed's own optimizer state
        assert again[step] == first[step], step
    assert _metric(resumed, "grad_norm") == {s: v for s, v in _metric(zero3_run, "grad_norm").items() if s > 2}
    a = load_file(str(resumed / "checkpoints" / "step_00000004" / "teacher_shard_00001.safetensors"))
    b = load_file(str(zero3_run / "checkpoints" / "step_00000004" / "teacher_shard_00001.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_from_zero_checkpoint_matches_final_export(zero_run, debug_models, tmp_path):
    out = tmp_path / "exported"
    done = run_dopsd(
        "export",
        "--model",
        str(debug_models["pipeline"]),
        "--checkpoint",
        str(zero_run / "checkpoints"),
        "--out",
        str(out),
        env=dist_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    exported = ZImageTransformer2DModel.from_pretrained(str(out / "transformer"))
    final = ZImageTransformer2DModel.from_pretrained(str(zero_run / "export" / "transformer"))
    base = ZImageTransformer2DModel.from_pretrained(str(debug_models["pipeline"] / "transformer"))
    a, b, c = exported.state_dict(), final.state_dict(), base.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[k], c[k]) for k in a)  # trained weights, not the base model's


def test_zero_checkpoint_refuses_another_world_size(zero3_run, debug_models, uniform_features, tmp_path):
    """One process (DeepSpeed's private one-rank group) cannot take a 2-rank ZeRO checkpoint: say so."""
    done = run_dopsd(
        "train",
        "--config",
        str(DEBUG_CONFIG),
        *train_overrides(
            debug_models,
            uniform_features,
            tmp_path / "run",
            "parallel.kind=deepspeed",
            "parallel.zero_stage=3",
            f"run.max_steps={STEPS + 1}",
            f"checkpoint.resume={zero3_run / 'checkpoints' / 'step_00000004'}",
        ),
        env=dist_env(),
        check=False,
    )
    assert done.returncode != 0
    assert "resumes on the same world size only" in done.stderr


def test_fsdp2_and_deepspeed_exports_agree(zero_run, tmp_path, debug_models, uniform_features):
    """The same training under FSDP2 and under ZeRO exports the same weights (fp32 reduction order aside)."""
    from safetensors.torch import load_file

    fsdp = tmp_path / "fsdp"
    torchrun_train(
        2,
        train_overrides(
            debug_models,
            uniform_features,
            fsdp,
            *SHARED,
            "parallel.kind=fsdp2",
            "data.batch_size=1",
            f"run.max_steps={STEPS}",
        ),
    )
    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(fsdp / "export" / name)), load_file(str(zero_run / "export" / name))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_zero2_with_an_anchor_stream_matches_single_process(debug_models, uniform_features, uniform_anchors, tmp_path):
    """Anchored D-OPSD (main batch + prompt-only anchor batch in one optimizer step) under ZeRO-2."""
    anchor = [f"anchor.path={uniform_anchors}", "run.max_steps=2", "checkpoint.export_final=false"]
    single = tmp_path / "single"
    Trainer(
        load_config(
            str(DEBUG_CONFIG), train_overrides(debug_models, uniform_features, single, "data.batch_size=2", *anchor)
        )
    ).fit()
    zero = tmp_path / "zero2"
    torchrun_train(
        2,
        train_overrides(
            debug_models,
            uniform_features,
            zero,
            "parallel.kind=deepspeed",
            "parallel.zero_stage=2",
            "data.batch_size=1",
            *anchor,
        ),
    )
    for key in ("loss", "anchor_loss"):
        a, b = _metric(single, key), _metric(zero, key)
        assert sorted(b) == [1, 2] and all(b[s] == pytest.approx(a[s], rel=LOSS_RTOL, abs=1e-12) for s in a), key
