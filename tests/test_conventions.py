"""Pin the Z-Image conventions: model time, velocity sign, schedule, latent shape, packing.

With random weights a wrong sign or time is silent, so the wrapper is tested against an analytic
velocity field whose exact ODE solution is known, and the whole sampler against ZImagePipeline.
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from torch import nn

from dopsd_scale.flow import euler_rollout, schedule, shift_sigmas
from dopsd_scale.models import Condition, get_spec
from dopsd_scale.models.zimage import REFERENCE_TRAIN_SIGMAS
from dopsd_scale.validation import sample_latents


class PointMassField(nn.Module):
    """A stand-in with Z-Image's forward signature for data concentrated at one point x0.

    For x_sigma = (1 - sigma) x0 + sigma eps the velocity is v = (x - x0) / sigma and every
    trajectory is a straight line, so Euler is exact on any schedule. Like Z-Image it receives
    t = 1 - sigma and returns -v. x0 is read from the caption features (their mean), so the
    test also checks that the condition reaches the model unpadded.
    """

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the wrapper a dtype to read

    def forward(self, x, t, cap_feats, return_dict=False, **kwargs):
        out = []
        for xi, ti, ci in zip(x, t, cap_feats):
            x0 = ci.mean()  # padding would change the mean
            sigma = 1.0 - ti
            out.append(-(xi - x0) / sigma)
        return (out,)


def _condition(lengths, dim=8, pad_to=12, value_of=lambda i: float(i + 1)):
    feats = torch.full((len(lengths), pad_to, dim), 100.0)  # padding that must never be seen
    mask = torch.zeros(len(lengths), pad_to, dtype=torch.bool)
    for i, n in enumerate(lengths):
        feats[i, :n] = value_of(i)
        mask[i, :n] = True
    return Condition(feats, mask)


def test_analytic_field_rolls_out_exactly(debug_models):
    spec = get_spec("zimage", debug_models["pipeline"])
    model = PointMassField()
    cond = _condition([3, 7])
    x0 = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    eps = torch.randn(2, 4, 4, 4, dtype=torch.float64).float()
    for sigmas in (spec.train_sigmas(4), spec.inference_sigmas(8, (4, 4, 4)), [1.0, 0.3]):
        s = schedule(sigmas)
        x = eps
        for k in range(len(s) - 1):
            sigma = torch.full((2,), float(s[k]))
            v = spec.velocity(model, x, sigma, cond)
            expected = (1 - s[k]) * x0 + s[k] * eps  # the exact solution at sigma_k
            torch.testing.assert_close(x, expected.float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, eps - x0.expand_as(eps), atol=1e-4, rtol=1e-4)
            x = x + (s[k + 1] - s[k]) * v
        torch.testing.assert_close(x, x0.expand_as(x).clone(), atol=1e-4, rtol=1e-4)


def test_linear_field_matches_exact_solution():
    """dx/dsigma = a x has x(sigma) = x(1) exp(a (sigma - 1)); fine Euler converges to it."""
    a = 0.7
    noise = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    sigmas = schedule(torch.linspace(1, 1e-3, 4000).tolist()[:-1] + [1e-3])
    out = euler_rollout(lambda x, s: a * x, noise, sigmas)
    torch.testing.assert_close(out, noise * torch.exp(torch.tensor(-a, dtype=torch.float64)), rtol=1e-3, atol=1e-3)


def test_inference_sigmas_match_the_pipeline_scheduler(debug_models):
    spec = get_spec("zimage", debug_models["pipeline"])
    pipe = ZImagePipeline.from_pretrained(str(debug_models["pipeline"]))
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(float(args[1][0])))
    pipe("a red circle", height=32, width=32, num_inference_steps=8, guidance_scale=0.0, output_type="latent")
    hook.remove()
    ours = spec.inference_sigmas(8, spec.latent_shape(32, 32))
    torch.testing.assert_close(torch.tensor([1 - t for t in seen]), torch.tensor(ours), atol=1e-6, rtol=0)
    # Z-Image-Turbo's static shift of 3 on linspace(1, 1/8, 8)
    torch.testing.assert_close(torch.tensor(ours), shift_sigmas(torch.linspace(1, 1 / 8, 8), 3.0), atol=1e-6, rtol=0)


def test_default_training_schedule_is_the_pipelines_own(debug_models):
    """K roll-out steps of training are K-step inference: K=4 is the reference code's list (every
    other sigma of the 8-step schedule), and any other K stays on the shifted schedule too."""
    spec = get_spec("zimage", debug_models["pipeline"])
    shape = spec.latent_shape(32, 32)
    torch.testing.assert_close(
        torch.tensor(spec.train_sigmas(4)), torch.tensor(REFERENCE_TRAIN_SIGMAS), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(spec.train_sigmas(4)), torch.tensor(spec.inference_sigmas(8, shape)[::2]), atol=1e-6, rtol=0
    )
    for k in (1, 2, 3, 6, 8):
        expected = shift_sigmas(torch.linspace(1, 1 / k, k, dtype=torch.float64), 3.0)
        torch.testing.assert_close(torch.tensor(spec.train_sigmas(k), dtype=torch.float64), expected, atol=1e-6, rtol=0)


def test_student_sampler_equals_zimage_pipeline(debug_models):
    """Our few-step sampler (sign, time, schedule, packing) reproduces ZImagePipeline's latents."""
    spec = get_spec("zimage", debug_models["pipeline"])
    pipe = ZImagePipeline.from_pretrained(str(debug_models["pipeline"]))
    embeds = pipe.encode_prompt(
        ["a red circle on a blue background", "a green square"], do_classifier_free_guidance=False
    )[0]
    shape = spec.latent_shape(32, 48)
    noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(5))
    ref = pipe(
        prompt_embeds=embeds,
        height=32,
        width=48,
        num_inference_steps=8,
        guidance_scale=0.0,
        latents=noise.clone(),
        output_type="latent",
    ).images
    ours = sample_latents(spec, pipe.transformer, embeds, 32, 48, 8, seed=5, device=torch.device("cpu"))
    assert ref.shape == ours.shape == (2, *shape)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(debug_models, tmp_path):
    spec = get_spec("zimage", debug_models["pipeline"])
    model = spec.load_transformer()
    model.save_pretrained(str(tmp_path / "t"))
    again = ZImageTransformer2DModel.from_pretrained(str(tmp_path / "t"))
    x = torch.randn(2, *spec.latent_shape(32, 32))
    cond = _condition([5, 9], dim=model.config.cap_feat_dim)
    sigma = torch.tensor([0.9, 0.4])
    torch.testing.assert_close(spec.velocity(again, x, sigma, cond), spec.velocity(model, x, sigma, cond))


def test_flops_and_sharding_units(debug_models):
    spec = get_spec("zimage", debug_models["pipeline"])
    model = spec.load_transformer()
    units = spec.sharding_units(model)
    assert len(units) == len(model.layers) + len(model.noise_refiner) + len(model.context_refiner)
    small = spec.flops_per_forward(model, spec.latent_shape(32, 32), 10)
    large = spec.flops_per_forward(model, spec.latent_shape(64, 64), 10)
    params = sum(p.numel() for p in model.parameters())
    assert small > 2 * params  # at least 2 FLOPs per parameter and token
    assert large > 3 * small  # 4x the image tokens
