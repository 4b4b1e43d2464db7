"""Pin the FLUX.2-klein conventions against Flux2KleinPipeline on the debug pipeline.

With random weights a wrong sign, time, packing, id layout, text length or normalisation is
silent, so the spec is tested against the stock pipeline (text-to-image and the editing call with
reference images, which is the `edit_reference` teacher), against an analytic velocity field
whose exact ODE solution is known, and against a FLOP counter.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dopsd_scale.encoders.flux2 import denormalize, normalize, patchify, unpatchify
from dopsd_scale.flow import euler_rollout, schedule
from dopsd_scale.models import Condition, detect_spec_name, get_spec
from dopsd_scale.models.debug_klein import TEXT_LAYERS, make_debug_klein
from dopsd_scale.models.flux2_klein import SETTINGS_FILE, Flux2KleinSpec
from dopsd_scale.validation import sample_latents

PROMPTS = ["a red circle on a blue background", "a green square"]


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return make_debug_klein(tmp_path_factory.mktemp("klein") / "pipeline")


@pytest.fixture(scope="module")
def spec(klein) -> Flux2KleinSpec:
    return get_spec("flux2_klein", klein)


@pytest.fixture(scope="module")
def pipe(klein) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline.from_pretrained(str(klein))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def encoders(spec):
    return spec.prompt_encoder(), spec.latent_encoder()


def _images(count: int, height: int, width: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def _condition(feats: list[torch.Tensor], refs=None) -> Condition:
    stacked = torch.stack(feats)
    return Condition(stacked, torch.ones(stacked.shape[:2], dtype=torch.bool), refs)


# ---- the acceptance test: our sampler is the pipeline ---------------------------------------------
def test_registry_and_detection(klein, spec):
    assert detect_spec_name(klein) == "flux2_klein"
    assert isinstance(spec, Flux2KleinSpec)
    assert spec.text_layers == TEXT_LAYERS and spec.max_sequence_length == 512 and spec.default_size == 64
    assert spec.latent_shape(64, 96) == (16, 4, 6)
    with pytest.raises(ValueError, match="multiple of 16"):
        spec.latent_shape(64, 72)


def test_student_sampler_equals_pipeline(spec, pipe, encoders):
    """Text-to-image: the validation sampler (spec velocity + Euler on inference_sigmas) reproduces
    the pipeline's latents from the same noise, and the spec's decode its images."""
    prompt_encoder, _ = encoders
    feats = prompt_encoder.encode(PROMPTS)
    shape = spec.latent_shape(64, 96)
    noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(3))
    kw = dict(prompt=PROMPTS, height=64, width=96, num_inference_steps=4, **spec.pipeline_kwargs)
    ref = pipe(**kw, latents=noise.clone(), output_type="latent").images
    ours = sample_latents(spec, pipe.transformer, feats, 64, 96, 4, seed=3, device=torch.device("cpu"))
    assert ref.shape == (2, 4, 8, 12)
    torch.testing.assert_close(denormalize(pipe.vae, ours), ref, atol=1e-5, rtol=1e-5)
    images = pipe(**kw, latents=noise.clone(), output_type="pt").images
    torch.testing.assert_close(spec.to_images(ours), images, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("height,width,n_refs", [(64, 64, 1), (64, 96, 1), (64, 64, 2)])
def test_teacher_sampler_equals_pipeline_editing_call(spec, pipe, encoders, height, width, n_refs):
    """With reference latents (the edit_reference teacher): the pipeline's `image=` call."""
    prompt_encoder, latent_encoder = encoders
    refs = _images(n_refs, height, width, seed=n_refs)
    shape = spec.latent_shape(height, width)
    noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(7))
    expected = pipe(
        prompt=PROMPTS,
        image=refs,
        height=height,
        width=width,
        num_inference_steps=4,
        latents=noise.clone(),
        output_type="latent",
        **spec.pipeline_kwargs,
    ).images
    ref_latents = latent_encoder.encode(refs)  # [R, C, h, w], as edit_reference stores them
    cond = _condition(prompt_encoder.encode(PROMPTS), ref_latents.unsqueeze(0).expand(2, -1, -1, -1, -1))
    sigmas = schedule(spec.inference_sigmas(4, shape))
    ours = euler_rollout(lambda x, s: spec.velocity(pipe.transformer, x, s, cond), noise, sigmas)
    torch.testing.assert_close(denormalize(pipe.vae, ours), expected, atol=1e-5, rtol=1e-5)
    plain = pipe(
        prompt=PROMPTS,
        height=height,
        width=width,
        num_inference_steps=4,
        latents=noise.clone(),
        output_type="latent",
        **spec.pipeline_kwargs,
    ).images
    assert (plain - expected).abs().max() > 1e-3  # the references do reach the model


# ---- encoders ------------------------------------------------------------------------------------
def test_prompt_encoder_equals_encode_prompt(spec, pipe, encoders):
    prompt_encoder, _ = encoders
    feats = prompt_encoder.encode(PROMPTS)
    expected = pipe.encode_prompt(PROMPTS, max_sequence_length=512, text_encoder_out_layers=TEXT_LAYERS)[0]
    assert all(f.shape == (512, 96) for f in feats)
    torch.testing.assert_close(torch.stack(feats), expected.detach(), atol=1e-6, rtol=1e-6)
    assert prompt_encoder.dim == spec.feature_dim(pipe.transformer) == 96
    assert prompt_encoder.texts(["x"])[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt_encoder.describe() == {
        "kind": "flux2_qwen3",
        "template": "chat/user",
        "enable_thinking": False,
        "hidden_layers": [1, 2, 3],
        "max_length": 512,
        "padding": "max_length",
        "padding_side": "right",
        "pads": "kept (no text mask)",
    }
    # the pads are part of the condition: they differ between prompts
    assert (feats[0][-1] - feats[1][-1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="512 padded text tokens"):
        spec.prompt_encoder(max_length=256)


def test_settings_file_chooses_the_text_layers(klein, tmp_path, pipe):
    """A pipeline directory's dopsd_klein.json is what the spec encodes with."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(klein, other)
    (other / SETTINGS_FILE).write_text(json.dumps({"text_encoder_out_layers": [2, 4], "max_sequence_length": 32}))
    spec = Flux2KleinSpec(other)
    encoder = spec.prompt_encoder(max_length=32)
    expected = pipe.encode_prompt(PROMPTS, max_sequence_length=32, text_encoder_out_layers=(2, 4))[0]
    torch.testing.assert_close(torch.stack(encoder.encode(PROMPTS)), expected.detach(), atol=1e-6, rtol=1e-6)
    assert spec.default_size == 1024  # 128 * vae_scale_factor when the file does not say
    (other / SETTINGS_FILE).write_text(json.dumps({"text_encoder_out_layers": [9, 18, 27]}))
    with pytest.raises(ValueError, match="do not fit a text encoder with 4 layers"):
        Flux2KleinSpec(other).prompt_encoder()


def test_latent_encoder_equals_prepare_image_latents(spec, pipe, encoders):
    _, latent_encoder = encoders
    images = _images(2, 64, 96, seed=5)
    ours = latent_encoder.encode(images)
    assert ours.shape == (2, *spec.latent_shape(64, 96))
    for image, latents in zip(images, ours):
        pixels = pipe.image_processor.preprocess(image, height=64, width=96, resize_mode="crop")
        tokens, ids = pipe.prepare_image_latents([pixels], 1, None, "cpu", pipe.vae.dtype)
        torch.testing.assert_close(latents.reshape(16, -1).T, tokens[0], atol=1e-5, rtol=1e-5)
        assert ids[0, :, 0].eq(10).all()
    assert latent_encoder.describe()["posterior"] == "mode"
    with pytest.raises(ValueError, match="multiple of 16"):
        latent_encoder.encode(_images(1, 64, 72))
    with pytest.raises(ValueError, match="one size"):
        latent_encoder.encode(_images(1, 64, 64) + _images(1, 64, 96))


def test_latent_space_round_trip(pipe):
    z = torch.randn(2, 4, 8, 12)
    assert torch.equal(unpatchify(patchify(z)), z)
    torch.testing.assert_close(denormalize(pipe.vae, normalize(pipe.vae, z)), z, atol=1e-5, rtol=1e-5)
    # channel c * 4 + 2 * dy + dx holds pixel (2i + dy, 2j + dx) of latent channel c
    assert patchify(z)[1, 2 * 4 + 2 * 1 + 0, 3, 5] == z[1, 2, 7, 10]


# ---- schedules -----------------------------------------------------------------------------------
def _pipeline_sigmas(pipe, spec, height: int, width: int, steps: int) -> list[float]:
    seen = []

    def hook(module, args, kwargs):
        seen.append(float(kwargs["timestep"][0]))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(
            prompt="a red circle",
            height=height,
            width=width,
            num_inference_steps=steps,
            output_type="latent",
            **spec.pipeline_kwargs,
        )
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("height,width,steps", [(64, 64, 4), (128, 96, 4), (64, 64, 2)])
def test_inference_sigmas_match_the_pipeline(spec, pipe, height, width, steps):
    ours = spec.inference_sigmas(steps, spec.latent_shape(height, width))
    torch.testing.assert_close(
        torch.tensor(_pipeline_sigmas(pipe, spec, height, width, steps)), torch.tensor(ours), atol=1e-6, rtol=0
    )


def test_training_schedules(spec):
    """Default: the pipeline's K-step schedule (per bucket, at the default size without a shape);
    the reference code's `set_timesteps(K, mu)` visits other states (DESIGN section 2)."""
    default = spec.latent_shape(spec.default_size, spec.default_size)
    assert spec.train_sigmas(4) == spec.inference_sigmas(4, default)
    big = spec.latent_shape(1024, 1024)  # 4096 tokens, as the real model at 1024^2
    assert spec.train_sigmas(4, big) == spec.inference_sigmas(4, big)
    torch.testing.assert_close(
        torch.tensor(spec.train_sigmas(4, big)), torch.tensor([1.0, 0.9674, 0.9081, 0.7672]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(spec.reference_train_sigmas(4, big)),
        torch.tensor([1.0, 0.9519, 0.8322, 0.0098]),
        atol=1e-4,
        rtol=0,
    )
    assert spec.train_sigmas(4, spec.latent_shape(512, 512)) != spec.train_sigmas(4, big)  # mu per bucket
    for k in (1, 2, 3, 6):
        sigmas = spec.train_sigmas(k)
        assert len(sigmas) == k and sigmas[0] == 1.0
        schedule(sigmas)  # strictly decreasing


def test_shifted_sigmas_is_the_exponential_shift(spec):
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    out = spec.shifted_sigmas(u)
    mu = compute_empirical_mu(16, spec.sample_steps)  # the debug default size: 4 x 4 tokens
    inner = u[1:]
    expected = math.exp(mu) / (math.exp(mu) + (1 / inner - 1))
    torch.testing.assert_close(out[1:], expected)
    assert out[0] == 0 and out[-1] == 1 and (out[1:] > out[:-1]).all()


# ---- the analytic field: sign, time, packing, ids ------------------------------------------------
class PointMassField(nn.Module):
    """A stand-in with Flux2Transformer2DModel's forward signature, for data concentrated at one
    point x0 per sample: v = (x - x0) / sigma, a straight line, so Euler is exact on any schedule.

    x0 of sample b at token (row, col) is `mean(caption_b) + 0.1 row + 0.01 col`, read from the
    whole caption (the pads count) and the token's own ids, so the test also checks the packing
    order, the ids and that the model gets `timestep = sigma` and returns `eps - x0` unflipped.
    Reference tokens must come after the noisy ones with t = 10, 20, ...; their output is garbage
    that the spec must slice away.
    """

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.seen: list[dict] = []

    def forward(
        self,
        hidden_states,
        encoder_hidden_states,
        timestep,
        img_ids,
        txt_ids,
        guidance=None,
        return_dict=True,
        **kwargs,
    ):
        assert guidance is None and txt_ids.shape == (encoder_hidden_states.shape[1], 4)
        assert torch.equal(txt_ids[:, 3], torch.arange(txt_ids.shape[0])) and not txt_ids[:, :3].any()
        noisy = img_ids[:, 0] == 0
        first_ref = int(noisy.sum())
        assert noisy[:first_ref].all() and not noisy[first_ref:].any()  # noisy tokens first
        self.seen.append({"ids": img_ids, "refs": hidden_states[:, first_ref:]})
        offset = 0.1 * img_ids[:, 1, None] + 0.01 * img_ids[:, 2, None]
        x0 = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1) + offset
        v = (hidden_states - x0) / timestep.view(-1, 1, 1)
        v[:, first_ref:] = 1e6
        return (v,)


def _analytic_condition(batch: int, refs=None) -> Condition:
    feats = torch.randn(batch, 512, 8, generator=torch.Generator().manual_seed(1))
    return Condition(feats, torch.ones(batch, 512, dtype=torch.bool), refs)


def _point_mass(cond: Condition, shape) -> torch.Tensor:
    c, h, w = shape
    rows = torch.arange(h).view(1, 1, h, 1) * 0.1
    cols = torch.arange(w).view(1, 1, 1, w) * 0.01
    return (cond.feats.mean(dim=(1, 2)).view(-1, 1, 1, 1) + rows + cols).expand(-1, c, h, w)


@pytest.mark.parametrize("n_refs", [0, 2])
def test_analytic_field_rolls_out_exactly(spec, n_refs):
    model = PointMassField()
    shape = spec.latent_shape(64, 96)
    refs = torch.randn(2, n_refs, 16, 4, 4) if n_refs else None
    cond = _analytic_condition(2, refs)
    x0 = _point_mass(cond, shape)
    eps = torch.randn(2, *shape)
    big = spec.latent_shape(1024, 1024)
    for sigmas in (
        spec.train_sigmas(4),
        spec.inference_sigmas(4, big),
        spec.reference_train_sigmas(4, big),
        [1.0, 0.3],
    ):
        s = schedule(sigmas)
        x = eps
        for k in range(len(s) - 1):
            v = spec.velocity(model, x, torch.full((2,), float(s[k])), cond)
            torch.testing.assert_close(x, ((1 - s[k]) * x0 + s[k] * eps).float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, eps - x0, atol=1e-4, rtol=1e-4)
            x = x + (s[k + 1] - s[k]) * v
        torch.testing.assert_close(x, x0.contiguous(), atol=1e-4, rtol=1e-4)
    if n_refs:  # reference i's token at ids (10 + 10 i, r, c) is ref_latents[:, i, :, r, c]
        ids, tokens = model.seen[-1]["ids"][24:], model.seen[-1]["refs"]
        expected = torch.stack([refs[:, t // 10 - 1, :, r, c] for t, r, c, _ in ids.tolist()], dim=1)
        assert torch.equal(tokens, expected)
        assert ids[:, 0].unique().tolist() == [10, 20]


def test_velocity_refuses_what_klein_cannot_read(spec):
    model, x = PointMassField(), torch.randn(2, *spec.latent_shape(64, 64))
    sigma = torch.full((2,), 0.5)
    stripped = _analytic_condition(2)
    stripped.mask[1, 300:] = False
    with pytest.raises(ValueError, match="padding-stripping encoder"):
        spec.velocity(model, x, sigma, stripped)
    short = Condition(torch.randn(2, 100, 8), torch.ones(2, 100, dtype=torch.bool))
    with pytest.raises(ValueError, match="must hold 512 tokens"):
        spec.velocity(model, x, sigma, short)
    with pytest.raises(ValueError, match="ref_latents must be"):
        spec.velocity(model, x, sigma, _analytic_condition(2, torch.randn(2, 16, 4, 4)))


def test_bf16_velocity_is_the_pipelines_transformer_call(klein, spec):
    """In bf16 (how klein runs), every step's velocity is bit-identical to the pipeline's model
    output, and a bf16 latent encoder gives the pipeline's bf16 reference tokens."""
    from dopsd_scale.encoders.flux2 import Flux2LatentEncoder

    pipe = Flux2KleinPipeline.from_pretrained(str(klein), dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = lambda m, args, kw, out: calls.append((kw["hidden_states"], kw["encoder_hidden_states"], out[0]))  # noqa: E731
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    refs = _images(1, 64, 64, seed=9)
    shape = spec.latent_shape(64, 64)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    try:
        pipe(
            prompt="a cat",
            image=refs,
            height=64,
            width=64,
            num_inference_steps=4,
            latents=noise,
            output_type="latent",
            **spec.pipeline_kwargs,
        )
    finally:
        handle.remove()
    ref_latents = Flux2LatentEncoder(klein / "vae", dtype=torch.bfloat16).encode(refs).to(torch.bfloat16)
    n = shape[1] * shape[2]
    for sigma, (hidden, feats, out) in zip(spec.inference_sigmas(4, shape), calls):
        x = hidden[:, :n].permute(0, 2, 1).reshape(1, *shape)
        cond = Condition(feats, torch.ones(feats.shape[:2], dtype=torch.bool), ref_latents.unsqueeze(0))
        v = spec.velocity(pipe.transformer, x, torch.tensor([sigma]), cond)
        assert torch.equal(v, out[:, :n].permute(0, 2, 1).reshape(1, *shape))
        assert torch.equal(hidden[:, n:], ref_latents.reshape(1, shape[0], -1).permute(0, 2, 1))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU autocast with fp32 norms
def test_timestep_goes_through_the_compute_dtype(spec, pipe):
    """The pipeline passes `(1000 sigma).to(dtype) / 1000`: in bf16, sigma .767 becomes 768 / 1000."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    cond = Condition(torch.randn(1, 512, 96), torch.ones(1, 512, dtype=torch.bool))
    x = torch.randn(1, *spec.latent_shape(64, 64))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            spec.velocity(pipe.transformer, x, torch.tensor([0.767]), cond)
        spec.velocity(pipe.transformer, x, torch.tensor([0.767]), cond)
    finally:
        handle.remove()
    assert seen[0].dtype == torch.bfloat16 and float(seen[0].to(torch.bfloat16) * 1000) == 768.0
    assert seen[1].dtype == torch.float32 and abs(float(seen[1]) - 0.767) < 1e-7


# ---- accounting, export -------------------------------------------------------------------------
def test_sharding_units_and_flops_match_a_flop_counter(spec, pipe):
    model = pipe.transformer
    units = spec.sharding_units(model)
    assert len(units) == 5 and units[0] is model.transformer_blocks[0]
    assert units[-1] is model.single_transformer_blocks[-1]
    shape = spec.latent_shape(64, 96)
    refs = torch.randn(2, 2, 16, 4, 6)
    for ref_latents, ref_tokens in ((None, 0), (refs, 48)):
        cond = Condition(torch.randn(2, 512, 96), torch.ones(2, 512, dtype=torch.bool), ref_latents)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            spec.velocity(model, torch.randn(2, *shape), torch.full((2,), 0.5), cond)
        assert counter.get_total_flops() == pytest.approx(2 * spec.flops_per_forward(model, shape, 512, ref_tokens))
    assert spec.flops_per_forward(model, spec.latent_shape(128, 128), 512) > spec.flops_per_forward(model, shape, 512)


def test_export_is_a_stock_pipeline(spec, pipe, tmp_path):
    target = spec.export(pipe.transformer, tmp_path / "export")
    root = target.parent
    assert (root / SETTINGS_FILE).is_file() and json.loads((root / "model_index.json").read_text())["is_distilled"]
    again = Flux2KleinPipeline.from_pretrained(str(root))
    again.set_progress_bar_config(disable=True)
    layers = json.loads((root / SETTINGS_FILE).read_text())["text_encoder_out_layers"]
    image = again(
        prompt="a red circle",
        height=64,
        width=64,
        num_inference_steps=4,
        text_encoder_out_layers=layers,
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    images = Flux2KleinSpec(root).generate(["a red circle", "a green square"], seed=1)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
