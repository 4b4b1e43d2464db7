"""LoRA mode (`model.finetune=lora`): a student adapter and its EMA teacher adapter on one frozen base.

One short run on the debug pipeline serves most tests: the base must come out bit for bit as it
went in, checkpoints hold adapters only, a resume continues the run bit for bit, the exported
adapter in the stock ZImagePipeline gives our sampler's images, and so does the merged export.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from diffusers import ZImagePipeline
from safetensors.torch import load_file

from dopsd_scale.config import ConfigError
from dopsd_scale.consolidate import read_entry
from dopsd_scale.flow import euler_rollout
from dopsd_scale.lora import STUDENT, TEACHER, AdapterView, adapter_pairs, add_adapters
from dopsd_scale.lora_files import LORA_WEIGHT_NAME
from dopsd_scale.metrics import read_metrics
from dopsd_scale.models.zimage import ZImageSpec, build_debug_transformer
from dopsd_scale.sample import checkpoint_transformer, resolve_spec
from dopsd_scale.teacher import AdapterTeacher
from dopsd_scale.trainer import Trainer

from .conftest import run_dopsd

STEPS = 4
# rank 4, alpha 8: the scale 2 is a power of two, so folding it into lora_B at export is exact
LORA = [
    "model.finetune=lora",
    "lora.rank=4",
    "lora.alpha=8",
    "teacher.ema_decay=0.5",
    "optim.lr=1e-2",
    "optim.warmup_steps=0",
]
QUIET = ["metrics.val_every=-1", "metrics.log_every=1", "metrics.tensorboard=false", "run.deterministic=true"]
PROMPTS = ["a red circle on a blue background", "a green square"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, debug_models, features):
    from dopsd_scale.config import load_config

    from .conftest import DEBUG_CONFIG

    run = tmp_path_factory.mktemp("lora") / "run"
    overrides = [
        f"model.path={debug_models['pipeline']}",
        f"data.path={features}",
        f"run.output_dir={run}",
        *LORA,
        *QUIET,
        f"run.max_steps={STEPS}",
        "checkpoint.every_steps=2",
        "lora.export_merged=true",
    ]
    with Trainer(load_config(str(DEBUG_CONFIG), overrides)) as trainer:
        trainer.fit()
    return trainer, run, overrides


def test_base_is_bitwise_unchanged_and_checkpoints_hold_adapters(lora_run):
    trainer, run, _ = lora_run
    base = trainer.spec.load_transformer().state_dict()
    seen = 0
    for name, p in trainer.model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
            seen += 1
    assert seen == len(base)
    student = read_entry(run / "checkpoints" / "step_00000004", "student")
    assert any(v.abs().sum() > 0 for k, v in student.items() if ".lora_B." in k)  # it trained
    keys = dcp.FileSystemReader(str(run / "checkpoints" / "step_00000004")).read_metadata().state_dict_metadata
    weights = [k for k in keys if k.startswith(("student.", "teacher."))]
    assert weights and all(".lora_" in k for k in weights)
    assert {k.split(".")[0] for k in keys} == {"student", "teacher", "optimizer"}


def test_teacher_adapter_is_the_ema_of_the_student_adapter():
    model = build_debug_transformer()
    add_adapters(model, 4, 8, ZImageSpec.lora_target_modules, teacher=True)
    teacher, student = adapter_pairs(model)
    assert all(torch.equal(t, s) for t, s in zip(teacher, student))  # starts as a copy
    grad_flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        for s in student:
            s.add_(torch.randn_like(s))
    before = [t.detach().clone() for t in teacher]
    ema = AdapterTeacher(model, "ema", decay=0.75)
    ema.update(model)
    for t, b, s in zip(teacher, before, student):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s, rtol=0, atol=1e-7)
    assert grad_flags == [p.requires_grad for p in model.parameters()]
    # the teacher's forward is the model with the teacher adapter on: peft's own switch agrees
    x = [torch.randn(4, 1, 8, 8)]
    args = (x, torch.tensor([0.4]), [torch.randn(5, 32)])
    with torch.no_grad():
        ours = ema.module(*args, return_dict=False)[0][0]
        base = AdapterView(model, None)(*args, return_dict=False)[0][0]
        model.set_adapter(TEACHER)
        peft = model(*args, return_dict=False)[0][0]
        model.set_adapter(STUDENT)
    assert torch.equal(ours, peft) and not torch.equal(ours, base)


def test_default_targets_are_the_main_blocks_attention_and_mlps():
    from dopsd_scale.lora import lora_layers
    from dopsd_scale.models.debug_klein import build_debug_klein_transformer
    from dopsd_scale.models.flux2_klein import Flux2KleinSpec

    def adapted(model, spec_class):
        """(module names after `<stack>.<N>.`, stacks) of the layers that got adapters."""
        add_adapters(model, 2, 2, spec_class.lora_target_modules, teacher=False)
        layers = {id(m) for m in lora_layers(model)}
        parts = [n.split(".", 2) for n, m in model.named_modules() if id(m) in layers]
        assert all(p[1].isdigit() for p in parts)
        return {p[2] for p in parts}, {p[0] for p in parts}

    suffixes, stacks = adapted(build_debug_transformer(), ZImageSpec)
    assert stacks == {"layers"}  # not the refiners
    assert suffixes == {
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    }
    suffixes, stacks = adapted(build_debug_klein_transformer(), Flux2KleinSpec)
    assert stacks == {"transformer_blocks", "single_transformer_blocks"}  # no modulation, embedders, norm_out
    assert suffixes == {
        f"attn.{n}"
        for n in (
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
            "to_qkv_mlp_proj",
            "to_out",
        )
    } | {"ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"}


def test_resume_continues_the_lora_run_bitwise(lora_run, tmp_path):
    from dopsd_scale.config import load_config

    from .conftest import DEBUG_CONFIG

    trainer, run, overrides = lora_run
    resumed = tmp_path / "resumed"
    again = [o for o in overrides if not o.startswith("run.output_dir")] + [
        f"run.output_dir={resumed}",
        f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}",
        "checkpoint.export_final=false",
    ]
    with Trainer(load_config(str(DEBUG_CONFIG), again)) as second:
        second.fit()
    a = {r["step"]: r for r in read_metrics(run)}
    b = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert (a[step]["loss"], a[step]["grad_norm"], a[step]["lr"]) == (
            b[step]["loss"],
            b[step]["grad_norm"],
            b[step]["lr"],
        )
    for which in ("student", "teacher"):
        x = read_entry(run / "checkpoints" / "step_00000004", which)
        y = read_entry(resumed / "checkpoints" / "step_00000004", which)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _images(pipe_or_spec, transformer=None):
    if isinstance(pipe_or_spec, ZImagePipeline):
        gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        images = pipe_or_spec(
            prompt=list(PROMPTS), height=32, width=32, num_inference_steps=8, guidance_scale=0.0, generator=gens
        ).images
    else:
        images = pipe_or_spec.generate(list(PROMPTS), steps=8, height=32, width=32, seed=0, transformer=transformer)
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_exports_give_our_samplers_images_in_the_stock_pipeline(lora_run, debug_models):
    trainer, run, _ = lora_run
    spec = resolve_spec(str(debug_models["pipeline"]))
    ours = _images(spec, checkpoint_transformer(spec, str(run / "checkpoints")))
    stock = ZImagePipeline.from_pretrained(str(debug_models["pipeline"]))
    base = _images(stock)
    stock.load_lora_weights(str(run / "export" / "lora"))
    assert np.array_equal(_images(stock), ours)
    assert np.abs(ours - base).max() > 0  # the adapter changes the images
    merged = _images(ZImagePipeline.from_pretrained(str(run / "export" / "merged")))
    assert np.abs(merged - ours).max() <= 1  # merging rounds W + s B A once, in fp32


def test_cli_export_of_a_lora_checkpoint_matches_the_final_export(lora_run, debug_models, tmp_path):
    _, run, _ = lora_run
    out = tmp_path / "exported"
    run_dopsd(
        "export",
        "--model",
        str(debug_models["pipeline"]),
        "--checkpoint",
        str(run / "checkpoints"),
        "--out",
        str(out),
    )
    a, b = load_file(str(out / "lora" / LORA_WEIGHT_NAME)), load_file(str(run / "export" / "lora" / LORA_WEIGHT_NAME))
    assert a.keys() == b.keys() and all(k.startswith("transformer.layers.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


STEPS_CONVERGE = 40
FACTOR = 4.0  # about 6x was measured (the full-model test: about 10x in 60 steps)


def test_lora_dopsd_moves_the_student_rollout_onto_the_teacher(make_config):
    cfg = make_config(
        "model.finetune=lora",
        "lora.rank=8",
        "lora.alpha=16",
        "teacher.ema_decay=0.999",
        "optim.lr=3e-3",
        "optim.warmup_steps=10",
        f"run.max_steps={STEPS_CONVERGE}",
    )
    trainer = Trainer(cfg)
    batch = next(trainer.loader)
    noise = torch.randn(
        (len(batch), *trainer.spec.latent_shape(*batch.bucket)), generator=torch.Generator().manual_seed(99)
    )

    def distance() -> float:
        spec, sigmas = trainer.spec, trainer.objective.sigmas
        with torch.no_grad():
            s = euler_rollout(lambda x, t: spec.velocity(trainer.model, x, t, batch.student), noise, sigmas)
            t_ = euler_rollout(lambda x, t: spec.velocity(trainer.teacher.module, x, t, batch.teacher), noise, sigmas)
        return torch.mean((s - t_) ** 2).item()

    before = distance()
    for _ in range(STEPS_CONVERGE):
        trainer.train_step(batch)
        trainer.step += 1
    after = distance()
    print(f"LoRA student-teacher roll-out MSE {before:.3e} -> {after:.3e} ({before / after:.1f}x)")
    assert after * FACTOR < before


@pytest.mark.parametrize(
    "override,field",
    [
        (["parallel.kind=deepspeed", "parallel.zero_stage=3"], "parallel.zero_stage"),
        (["lora.target_modules=(unclosed"], "lora.target_modules"),
        (["lora.rank=0"], "lora.rank"),
    ],
)
def test_lora_config_errors_name_the_field(make_config, override, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        make_config("model.finetune=lora", *override)
