"""LoRA mode on 2 CPU ranks (gloo, torchrun): FSDP2 and DeepSpeed ZeRO-2 match one process at the
same global batch, adapter for adapter, and an FSDP2 LoRA checkpoint resumes on one process."""

from __future__ import annotations

import pytest
import torch

from dopsd_scale.config import load_config
from dopsd_scale.consolidate import read_entry
from dopsd_scale.metrics import read_metrics
from dopsd_scale.sample import export_checkpoint
from dopsd_scale.trainer import Trainer

from ..conftest import DEBUG_CONFIG
from .conftest import torchrun_train, train_overrides, train_single

STEPS = 4
LOSS_RTOL = 1e-4  # fp32 everywhere; only the order of reductions differs
# a fast EMA makes a wrongly updated (sharded) teacher adapter show in the next steps' losses
LORA = ["model.finetune=lora", "lora.rank=4", "lora.alpha=8", "teacher.ema_decay=0.5", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, debug_models, uniform_features):
    run = tmp_path_factory.mktemp("lora_single") / "run"
    return train_single(run, debug_models, uniform_features, *LORA, f"run.max_steps={STEPS}")


def _sharded(tmp_path_factory, debug_models, features, kind: str):
    run = tmp_path_factory.mktemp(f"lora_{kind}") / "run"
    torchrun_train(
        2,
        train_overrides(
            debug_models,
            features,
            run,
            *LORA,
            f"parallel.kind={kind}",
            "data.batch_size=1",
            f"run.max_steps={STEPS}",
            "checkpoint.every_steps=2",
        ),
    )
    return run


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, debug_models, uniform_features):
    return _sharded(tmp_path_factory, debug_models, uniform_features, "fsdp2")


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, debug_models, uniform_features):
    return _sharded(tmp_path_factory, debug_models, uniform_features, "deepspeed")


@pytest.fixture(params=["fsdp2", "zero2"])
def sharded_run(request):
    return request.getfixturevalue(f"{request.param}_run")


def _metric(run, key):
    return {r["step"]: r[key] for r in read_metrics(run)}


def test_sharded_lora_matches_one_process(single_run, sharded_run):
    for key in ("loss", "grad_norm", "lr"):
        single, sharded = _metric(single_run, key), _metric(sharded_run, key)
        assert sorted(sharded) == list(range(1, STEPS + 1))
        for step in single:
            assert sharded[step] == pytest.approx(single[step], rel=LOSS_RTOL), (key, step)
    for which in ("student", "teacher"):  # the adapters themselves, consolidated offline
        a = read_entry(single_run / "checkpoints" / "step_00000004", which)
        b = read_entry(sharded_run / "checkpoints" / "step_00000004", which, adapters_only=True)
        assert a.keys() == b.keys() and all(".lora_" in k for k in a)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"{which} {k}")


def test_sharded_lora_export_matches_offline_export(sharded_run, debug_models, tmp_path):
    """The export at the end of training (gathering the adapter only) is what offline consolidation
    of the last checkpoint gives."""
    from safetensors.torch import load_file

    out = export_checkpoint(str(debug_models["pipeline"]), str(sharded_run / "checkpoints"), str(tmp_path / "x"))
    a = load_file(str(out / "pytorch_lora_weights.safetensors"))
    b = load_file(str(sharded_run / "export" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_lora_checkpoint_resumes_on_one_process(fsdp2_run, debug_models, uniform_features, tmp_path):
    """Another world size: DCP reshards the adapters and their optimizer state (2 ranks -> 1)."""
    resumed = tmp_path / "resumed"
    cfg = load_config(
        str(DEBUG_CONFIG),
        train_overrides(
            debug_models,
            uniform_features,
            resumed,
            *LORA,
            "data.batch_size=2",
            f"run.max_steps={STEPS}",
            f"checkpoint.resume={fsdp2_run / 'checkpoints' / 'step_00000002'}",
            "checkpoint.export_final=false",
        ),
    )
    with Trainer(cfg) as trainer:
        trainer.fit()
    again, first = _metric(resumed, "loss"), _metric(fsdp2_run, "loss")
    assert sorted(again) == [3, 4]
    for step in again:
        assert again[step] == pytest.approx(first[step], rel=LOSS_RTOL), step
