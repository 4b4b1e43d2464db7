"""Fixtures of the evaluation tests: tiny random encoders built from configs (no downloads), a tuned
export and a checkpoint of the debug pipeline, prompt files, and constructed image sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

CONCEPT = ["a red circle on a blue background", "a sks square on a white background", "a green triangle"]
GENERAL = ["a yellow circle", "a black square on a red background"]
FAST = ["--height", "32", "--width", "32", "--steps", "2"]


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory) -> dict[str, Path]:
    """{"clip": dir, "dino": dir}: random CLIP and DINOv2 saved and loaded like real ones."""
    from dopsd_scale.evaluation.encoders import build_tiny_clip, build_tiny_dinov2

    root = tmp_path_factory.mktemp("encoders")
    return {"clip": build_tiny_clip(root / "clip"), "dino": build_tiny_dinov2(root / "dino")}


@pytest.fixture(scope="session")
def tuned_export(tmp_path_factory, debug_models) -> Path:
    """The debug pipeline with every transformer weight moved a little: a tuned model's export."""
    from dopsd_scale.models import get_spec

    spec = get_spec("zimage", debug_models["pipeline"])
    model = spec.load_transformer()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("tuned") / "export"
    spec.export(model, out)
    return out


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory, debug_models) -> Path:
    """A DCP checkpoint whose student holds the base's own weights (a run that has not moved):
    its images must equal the base's exactly."""
    import torch.distributed.checkpoint as dcp

    from dopsd_scale.models import get_spec

    model = get_spec("zimage", debug_models["pipeline"]).load_transformer()
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "step_00000001"
    dcp.save({"student": model.state_dict()}, checkpoint_id=str(path))
    (path / "rank_00000.json").write_text(json.dumps({"step": 1}), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    (root / "concept.txt").write_text("\n".join(CONCEPT) + "\n", encoding="utf-8")
    (root / "general.txt").write_text("# general prompts\n" + "\n".join(GENERAL) + "\n\n", encoding="utf-8")
    return {"concept": root / "concept.txt", "general": root / "general.txt"}


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n smooth random colour images [n, 3, size, size] in [0, 1] (upsampled 4x4 noise)."""
    base = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


def rectangles(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """n images of random rectangles on random backgrounds: hard edges, for sharpness tests."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.rand(n, 3, 1, 1, generator=gen).expand(n, 3, size, size).clone()
    for i in range(n):
        for _ in range(6):
            y0, x0 = torch.randint(0, size - 8, (2,), generator=gen).tolist()
            h, w = torch.randint(6, size // 2, (2,), generator=gen).tolist()
            out[i, :, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=gen)
    return out


def blur(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    k = torch.exp(-(torch.arange(-4, 5).float() ** 2) / (2 * sigma * sigma))
    k = (k / k.sum()).view(1, 1, 1, 9).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="reflect"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, 4, 4), mode="reflect"), k.transpose(-1, -2), groups=3)
