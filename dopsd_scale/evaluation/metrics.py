"""Evaluation metrics in plain torch: no state, no scipy, no torchmetrics; each testable on tensors.

Conventions: images are float [N, 3, H, W] in [0, 1]; features are [N, d]. Every function returns
per-sample values where a per-sample value exists (the caller averages per seed and takes the
interval over seeds, see :mod:`dopsd_scale.stats`), and one number for set-level distances.

- CLIP score: `100 * max(cos(text, image), 0)` per sample (the common text-to-image "CLIP score";
  Hessel et al.'s CLIPScore is 2.5 * max(cos, 0), i.e. 0.025 times ours).
- Image similarity (DINO / CLIP-I, as in DreamBooth): per generated image, its mean cosine to all
  target images.
- Fréchet distance in an encoder's feature space (`FD_<encoder>`, not FID: the features are not
  Inception's), exact for any n and d through the smallest Gram matrix (see `_trace_sqrt_product`).
- KID: unbiased MMD^2 with the cubic polynomial kernel `(x.y / d + 1)^3`, averaged over seeded
  subsets drawn without replacement (Binkowski et al. 2018; torchmetrics' estimator, seedable).
- Sharpness: variance of the Laplacian of luma at a fixed resolution, as `log(model / reference)`;
  reported together with the colour distance (sliced W1 of pixel colours) because noise alone
  raises the Laplacian variance, and it raises the colour distance at the same time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP = 100.0
"""dB reported for identical images (MSE 0)."""


# ---- text-image and image-image similarity -----------------------------------------------------------
def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two [N, d] feature sets (pairs: a_i with b_i)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, M] cosines of every a_i with every b_j."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def clip_score(text_feats: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
    """Per pair (prompt_i, image_i): 100 * max(cos, 0), clamped per sample (not the mean)."""
    return 100.0 * cosine(text_feats, image_feats).clamp_min(0.0)


def mean_similarity(generated: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per generated image: its mean cosine to all target images (DINO / CLIP-I fidelity)."""
    return cosine_matrix(generated, targets).mean(dim=1)


def pair_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 - cos (retention: a tuned image against the base's from the same noise)."""
    return 1.0 - cosine(a, b)


def mse_psnr(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair of images in [0, 1]: MSE and PSNR = 10 log10(1 / MSE), capped at PSNR_CAP dB."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1)
    psnr = (10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))).clamp(max=PSNR_CAP)
    return mse, psnr


# ---- set distances ---------------------------------------------------------------------------
def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2), in float64, clamped at 0 (rounding)."""
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError(f"the Fréchet distance needs >= 2 samples per set, got {len(f1)} and {len(f2)}")
    a, b = f1.double(), f2.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    ca, cb = a - mu1, b - mu2
    n1, n2 = len(a) - 1, len(b) - 1
    trace_sqrt = _trace_sqrt_product(ca, cb) / math.sqrt(n1 * n2)
    fd = (mu1 - mu2).square().sum() + ca.square().sum() / n1 + cb.square().sum() / n2 - 2.0 * trace_sqrt
    return max(float(fd), 0.0)


def _trace_sqrt_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tr((A^T A)(B^T B))^(1/2) for centred feature rows A [n1, d], B [n2, d].

    The eigenvalues of (A^T A)(B^T B) are the squared singular values of A B^T, so the trace is the
    nuclear norm of A B^T ([n1, n2]); when d is the smallest size, the symmetric d x d form
    G1^(1/2) G2 G1^(1/2) has the same eigenvalues. Either way only symmetric solvers or an SVD run,
    never a non-symmetric eigensolver, and an identical pair gives exactly tr(A^T A).
    """
    if a.shape[1] <= min(len(a), len(b)):
        w, v = torch.linalg.eigh(a.T @ a)
        root = (v * w.clamp_min(0).sqrt()) @ v.T
        return torch.linalg.eigvalsh(root @ (b.T @ b) @ root).clamp_min(0).sqrt().sum()
    return torch.linalg.svdvals(a @ b.T).sum()


def kid(
    f1: torch.Tensor, f2: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean, std over subsets) of the unbiased MMD^2 with kernel (x.y / d + 1)^3.

    Subsets of m = min(subset_size, n1, n2) rows are drawn without replacement from a generator
    seeded here (reproducible, unlike a global RNG). Unbiased: about 0 for one distribution, and
    it can be slightly negative.
    """
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs >= 2 samples per set, got {len(f1)} and {len(f2)}")
    a_all, b_all = f1.double(), f2.double()
    gen = torch.Generator().manual_seed(seed)
    gamma = 1.0 / a_all.shape[1]
    values = []
    for _ in range(subsets):
        a = a_all[torch.randperm(len(a_all), generator=gen)[:m]]
        b = b_all[torch.randperm(len(b_all), generator=gen)[:m]]
        kxx, kyy, kxy = ((x @ y.T * gamma + 1.0) ** 3 for x, y in ((a, a), (b, b), (a, b)))
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(within - 2.0 * kxy.sum() / (m * m))
    v = torch.stack(values)
    return float(v.mean()), float(v.std(unbiased=False))


# ---- few-step quality: sharpness with colour ---------------------------------------------------------
def fit_square(images: list[torch.Tensor] | torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop each image to a square and resize it to `size` (bicubic, antialiased):
    sharpness depends on scale, so every set is measured at the same resolution."""
    out = []
    for x in images:
        h, w = x.shape[-2:]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        crop = x[..., top : top + s, left : left + s].float().unsqueeze(0)
        if s != size:
            crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out.append(crop.clamp(0, 1))
    return torch.cat(out)


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def luma(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] Rec. 601 luma of RGB images."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def laplacian_variance(x: torch.Tensor) -> torch.Tensor:
    """Per image: variance of the 3x3 Laplacian of luma over valid pixels (no border artefacts)."""
    return F.conv2d(luma(x.float()), _LAPLACIAN.to(x.device)).flatten(1).var(dim=1)


def sharpness_log_ratio(x: torch.Tensor, reference: torch.Tensor) -> float:
    """log(mean Laplacian variance of x / that of the reference set): 0 = as sharp, < 0 blurrier."""
    ratio = laplacian_variance(x).mean().clamp_min(1e-12) / laplacian_variance(reference).mean().clamp_min(1e-12)
    return float(torch.log(ratio))


def colour_swd(
    a: torch.Tensor,
    b: torch.Tensor,
    projections: int = 64,
    pixels_per_image: int = 1024,
    quantiles: int = 256,
    seed: int = 0,
) -> float:
    """Sliced W1 between the pixel-colour distributions of two image sets of the same resolution.

    The same seeded pixel positions are taken from every image of both sets and projected on the
    same seeded unit directions of RGB; the distance is the mean gap of `quantiles` quantiles of
    each projection. Deterministic, exactly 0 for the same set in any order, any set sizes.
    """
    gen = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(3, projections, generator=gen, dtype=torch.float64), dim=0)
    hw = a.shape[-2] * a.shape[-1]
    if b.shape[-2] * b.shape[-1] != hw:
        raise ValueError(f"colour_swd: sets differ in resolution ({tuple(a.shape[-2:])} vs {tuple(b.shape[-2:])})")
    picks = torch.randperm(hw, generator=gen)[: min(pixels_per_image, hw)]

    def projected_quantiles(x: torch.Tensor) -> torch.Tensor:
        colours = x.double().flatten(2)[..., picks].permute(0, 2, 1).reshape(-1, 3)
        proj = (colours @ directions.to(colours.device)).T.sort(dim=1).values  # [P, pixels], sorted rows
        idx = ((torch.arange(quantiles, dtype=torch.float64) + 0.5) / quantiles * proj.shape[1]).long()
        return proj[:, idx.clamp(max=proj.shape[1] - 1).to(proj.device)]

    return float((projected_quantiles(a) - projected_quantiles(b)).abs().mean())
