"""Every evaluation metric on constructed cases it must get right, the interval arithmetic, the
encoders built from configs, and the scorer's wiring with stub encoders (random weights carry no
semantics, so alignment direction is tested with encoders whose features are known)."""

from __future__ import annotations

import math

import pytest
import torch

from dopsd_scale.config import ConfigError
from dopsd_scale.evaluation import metrics as M
from dopsd_scale.evaluation.encoders import PixelEncoder, load_encoder
from dopsd_scale.evaluation.run import EvalOptions, Scorer, summarize

from .conftest import blur, rectangles, smooth_images


def _reference_fd(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """torchmetrics' formula: non-symmetric eigenvalues of S1 S2."""
    f1, f2 = f1.double(), f2.double()
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    tr = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float((f1.mean(0) - f2.mean(0)).square().sum() + s1.trace() + s2.trace() - 2 * tr)


@pytest.mark.parametrize("n1,n2,d", [(60, 50, 8), (10, 12, 32), (5, 40, 16)])
def test_frechet_distance_matches_the_eigenvalue_formula_for_any_n_and_d(n1, n2, d):
    gen = torch.Generator().manual_seed(n1 + d)
    a, b = torch.randn(n1, d, generator=gen), 1.3 * torch.randn(n2, d, generator=gen) + 0.2
    assert M.frechet_distance(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-6)
    assert M.frechet_distance(a, b) == pytest.approx(M.frechet_distance(b, a), rel=1e-9)  # symmetric
    assert M.frechet_distance(a, a) < 1e-9


def test_fd_and_kid_identical_sets_near_zero_shifted_sets_far():
    pixels = PixelEncoder(4)
    feats = pixels.encode_images(list(smooth_images(48)))
    darker = pixels.encode_images(list(smooth_images(48) * 0.5))
    fresh = pixels.encode_images(list(smooth_images(48, seed=1)))  # the same distribution, other draws
    assert M.frechet_distance(feats, feats) < 1e-9
    assert M.frechet_distance(feats, darker) > 3 * M.frechet_distance(feats, fresh) > 0
    same, _ = M.kid(feats, feats, subsets=20, subset_size=24)
    shifted, _ = M.kid(feats, darker, subsets=20, subset_size=24)
    assert abs(same) < 0.1 * shifted
    assert M.kid(feats, darker, subsets=5, subset_size=24, seed=3) == M.kid(
        feats, darker, subsets=5, subset_size=24, seed=3
    )
    with pytest.raises(ValueError):
        M.frechet_distance(feats[:1], feats)


def test_clip_score_is_100_max_cos_per_sample():
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    image = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    assert M.clip_score(text, image).tolist() == pytest.approx([100.0, 0.0, 100 / math.sqrt(2)])


def test_similarity_retention_and_psnr_on_identical_and_degraded_images(tiny_encoders):
    dino = load_encoder(tiny_encoders["dino"], "--dino")
    images = smooth_images(6)
    noisy = [
        (images + s * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
        for s in (0.05, 0.3)
    ]
    f, f_small, f_large = (dino.encode_images(list(x)) for x in (images, *noisy))
    assert M.mean_similarity(f[:1], f[:1]).item() == pytest.approx(1.0, abs=1e-5)
    assert M.pair_distance(f, f).abs().max() < 1e-5
    assert 0 < M.pair_distance(f_small, f).mean() < M.pair_distance(f_large, f).mean()
    mse, psnr = M.mse_psnr(images, images)
    assert mse.max() == 0 and psnr.min() == M.PSNR_CAP
    assert M.mse_psnr(noisy[0], images)[1].mean() > M.mse_psnr(noisy[1], images)[1].mean()


def test_encoders_from_configs_are_batch_invariant_and_agree_with_the_hf_processor(tiny_encoders):
    from transformers import AutoImageProcessor

    images = list(smooth_images(5, size=40))
    for flag in ("clip", "dino"):
        enc = load_encoder(tiny_encoders[flag], f"--{flag}")
        full, one = enc.encode_images(images), enc.encode_images(images[:1])
        assert torch.allclose(full[:1], one, atol=1e-5)
    dino = load_encoder(tiny_encoders["dino"], "--dino")
    u8 = [(x * 255).round().to(torch.uint8) for x in images]
    hf = AutoImageProcessor.from_pretrained(str(tiny_encoders["dino"]))(images=u8, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = dino.encode_images([x.float() / 255 for x in u8])
        theirs = dino.model(pixel_values=hf).pooler_output
    assert M.cosine(ours, theirs).min() > 0.999
    clip = load_encoder(tiny_encoders["clip"], "--clip", need_text=True)
    assert clip.encode_text(["a red circle", "ünïcode ✓ " * 40]).shape == (2, 16)  # any text, truncated


def test_encoder_errors_name_the_flag(tmp_path, tiny_encoders):
    with pytest.raises(FileNotFoundError, match=r"^--dino .*: no such directory"):
        load_encoder(tmp_path / "missing", "--dino")
    with pytest.raises(ConfigError, match="--clip .*whole CLIP"):
        load_encoder(tiny_encoders["dino"], "--clip", need_text=True)


def test_sharpness_and_colour_on_blur_noise_and_permutation():
    ref = rectangles(12)
    blurred = blur(ref)
    noisy = (blurred + 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert M.sharpness_log_ratio(ref, ref) == pytest.approx(0.0, abs=1e-6)
    assert M.sharpness_log_ratio(blurred, ref) < -1.0
    assert M.sharpness_log_ratio(noisy, ref) > M.sharpness_log_ratio(blurred, ref)  # noise buys "sharpness" ...
    assert M.colour_swd(noisy, ref) > M.colour_swd(blurred, ref) > 0  # ... and pays in colour distance
    assert M.colour_swd(ref, ref.flip(0)) == 0.0
    assert M.colour_swd(ref * 0.8 + 0.1, ref) > M.colour_swd(blurred, ref)
    squares = M.fit_square([ref[0, :, :40, :]], 16)
    assert squares.shape == (1, 3, 16, 16) and 0 <= squares.min() and squares.max() <= 1


def test_interval_over_seeds():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["n"] == 3
    assert s["half"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert summarize([5.0])["half"] is None  # one seed: no interval
    assert summarize([1.0, 1.0])["half"] == 0.0


class _StubCLIP:
    """Text: 'red' -> +R axis, 'blue' -> +B axis; images: mean colour minus grey."""

    name = "CLIP"

    def describe(self) -> dict:
        return {"name": self.name}

    def encode_text(self, prompts):
        return torch.tensor([[1.0, 0.0, 0.0] if "red" in p else [0.0, 0.0, 1.0] for p in prompts])

    def encode_images(self, images):
        return torch.stack([x.mean(dim=(1, 2)) - 0.5 for x in images])


def _solid(colour, n=3, size=16):
    return [torch.tensor(colour).view(3, 1, 1).expand(3, size, size).clone() for _ in range(n)]


def test_scorer_alignment_direction_retention_and_quality_with_stub_encoders():
    stub = _StubCLIP()
    scorer = Scorer(EvalOptions(base="b", out="o", quality_size=16, kid_subsets=5), [stub], stub, stub)
    prompts = ["a red square", "a red circle", "a red thing"]
    text = scorer.text_features(prompts)
    red, blue = _solid([0.9, 0.1, 0.1]), _solid([0.1, 0.1, 0.9])
    views = {"base": scorer.view(red), "tuned": scorer.view(blue), "same": scorer.view(red)}
    out = scorer.score_seed("general", views, text)
    assert out["clip_score"]["base"] > 50 > out["clip_score"]["tuned"]
    assert out["delta_clip_score"]["tuned"] < 0 and out["delta_clip_score"]["same"] == 0
    assert abs(out["retention_CLIP"]["same"]) < 1e-6 < out["retention_CLIP"]["tuned"]
    assert out["retention_psnr"]["same"] == M.PSNR_CAP > out["retention_psnr"]["tuned"]
    assert out["colour_swd"]["same"] == 0 < out["colour_swd"]["tuned"]
    assert "base" not in out["sharpness"]  # the base is the general set's quality reference


def test_placeholder_is_replaced_for_clip_only():
    stub = _StubCLIP()
    scorer = Scorer(EvalOptions(base="b", out="o", placeholder="sks=red"), [stub], stub, stub)
    assert scorer.text_features(["a sks dog"]).tolist() == [[1.0, 0.0, 0.0]]
    with pytest.raises(ConfigError, match="--placeholder"):
        Scorer(EvalOptions(base="b", out="o", placeholder="sks"), [stub], stub, stub)
