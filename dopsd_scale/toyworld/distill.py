"""Step distillation of the toy base to its 4-step schedule (trajectory distillation).

The frozen pretrained model (its EMA weights) samples `trajectories` items of the pretraining
mix (prompt-only and in-context) with a fine Euler sampler: `substeps` steps inside each interval
of the 4-step schedule (1, .9, .75, .5, 0; 32 steps in all by default). Its states at the 5
schedule points are stored once (`trajectories.safetensors`). The student then learns, at each
point x_k, the velocity that jumps to the next point: `(x_{k+1} - x_k) / (sigma_{k+1} - sigma_k)`,
so its own 4 Euler steps follow the fine sampler's path instead of averaging over the paths that
pass through x_k (which is what a flow-matching model sampled at 4 steps does: blur).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..flow import schedule
from .evaluate import ToyModel
from .pretrain import PRETRAIN_MIX, _setup, draw_batch, finalize, load_ema, run_phase, velocity_mixed


@torch.no_grad()
def fine_states(
    toy: ToyModel,
    teacher,
    noise: torch.Tensor,
    captions: list[str],
    refs: torch.Tensor,
    has_ref: torch.Tensor,
    sigmas: torch.Tensor,
    substeps: int,
) -> torch.Tensor:
    """[B, K + 1, 3, H, W]: the fine Euler trajectory of the teacher at every schedule point."""
    x, states = noise, [noise]
    for k in range(len(sigmas) - 1):
        fine = torch.linspace(float(sigmas[k]), float(sigmas[k + 1]), substeps + 1, dtype=torch.float64)
        for j in range(substeps):
            s = torch.full((len(x),), float(fine[j]))
            x = x + (float(fine[j + 1]) - float(fine[j])) * velocity_mixed(toy, teacher, x, s, captions, refs, has_ref)
        states.append(x)
    return torch.stack(states, dim=1)


def make_trajectories(
    path: Path, toy: ToyModel, teacher, count: int, sigmas: torch.Tensor, substeps: int, seed: int, batch: int = 256
) -> None:
    """Sample `count` items of the pretraining mix with the fine sampler; store their states."""
    parts, captions = [], []
    for i, start in enumerate(range(0, count, batch)):
        n = min(batch, count - start)
        items, _, refs, has_ref = draw_batch(10_000_000 + i, n, seed, PRETRAIN_MIX, toy.spec.reference_style)
        noise = torch.randn((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed * 7_919 + i))
        caps = [it.caption for it in items]
        states = fine_states(toy, teacher, noise, caps, refs, has_ref, sigmas, substeps)
        parts.append((states, refs, has_ref))
        captions += caps
    tensors = {
        "states": torch.cat([p[0] for p in parts]),
        "refs": torch.cat([p[1] for p in parts]),
        "has_ref": torch.cat([p[2] for p in parts]).to(torch.uint8),
        "sigmas": sigmas.float(),
    }
    save_file(tensors, str(path), metadata={"captions": json.dumps(captions), "substeps": str(substeps)})


def distill(
    base: Path,
    out: Path,
    steps: int,
    minutes: float,
    batch: int = 64,
    lr: float = 2e-4,
    seed: int = 1,
    substeps: int = 8,
    trajectories: int = 4096,
    eval_every: int = 100,
) -> Path:
    """Distil `base` (a pretrain output directory) into `out` (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model" / "toyworld.json").is_file():
        src = ToyModel.load(base / "model")
        src.spec.export(load_ema(base, src), out / "model")
    toy, model, ema, optimizer = _setup(out / "model", lr)
    sigmas = schedule(toy.spec.train_sigmas(toy.spec.sample_steps))
    data = out / "trajectories.safetensors"
    if not data.is_file():
        teacher = toy.spec.load_transformer().eval().requires_grad_(False)
        make_trajectories(data, toy, teacher, trajectories, sigmas, substeps, seed)
    stored = load_file(str(data))
    from safetensors import safe_open

    with safe_open(str(data), "pt") as f:
        captions = json.loads(f.metadata()["captions"])
    states, refs, has_ref = stored["states"], stored["refs"], stored["has_ref"].bool()
    k_max = len(sigmas) - 1

    def loss_fn(step: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, step])
        idx = torch.from_numpy(rng.integers(len(states), size=batch))
        k = torch.from_numpy(rng.integers(k_max, size=batch))
        x, x_next = states[idx, k], states[idx, k + 1]
        s, s_next = sigmas[k].float(), sigmas[k + 1].float()
        target = (x_next - x) / (s_next - s).view(-1, 1, 1, 1)
        v = velocity_mixed(toy, model, x, s, [captions[i] for i in idx.tolist()], refs[idx], has_ref[idx])
        return torch.mean((v - target) ** 2)

    run_phase(out, toy, model, ema, optimizer, loss_fn, steps, minutes, lr, 0.99, eval_every, "distill")
    return finalize(out, toy, ema)
