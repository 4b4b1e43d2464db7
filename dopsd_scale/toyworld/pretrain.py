"""Reproduce the shipped toy base: in-context pretraining (here); optional step distillation.

    python -m dopsd_scale.toyworld.pretrain pretrain --out runs/toy/pretrain --steps 3500
    python -m dopsd_scale.toyworld.pretrain distill --base runs/toy/pretrain --out runs/toy/distill

Pretraining is flow matching (`sigma = shift(u)`, u uniform, Z-Image's shift 3) on freshly
rendered batches of a mix that teaches both branches of the one network:
  35% old shape, its own word, prompt only                  (the student's task)
  25% old shape with its reference image                    (in-context, known word)
  40% unknown word, a random blob or spiky polygon + reference (in-context: copy the outline)
The star and its word never appear. The blobs are what makes the in-context branch copy an
outline it has never seen. An EMA of the weights is kept beside the raw weights.

The shipped base is the raw pretrained weights: they already sample best at 4 Euler steps (better
than at 8 or 32), so trajectory distillation (`distill.py`, kept to reproduce that finding) was
not applied; `toyworld.json` ("made_by", "measured") records how it was made and measured.
Both phases checkpoint to `<out>/state/` (safetensors + JSON) and resume when rerun.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..flow import shift_sigmas
from ..models.spec import Condition
from . import world
from .base import init_model_dir
from .evaluate import ToyModel, evaluate

log = logging.getLogger(__name__)
PRETRAIN_MIX = {"text": 0.35, "old_ref": 0.25, "unknown_ref": 0.40}


# ---- batches --------------------------------------------------------------------------------
def draw_batch(
    step: int, size: int, seed: int, mix: dict, style: str = "silhouette"
) -> tuple[list[world.Item], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(items, images, references, has_reference) of one step, a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    kinds = rng.choice(len(mix), size=size, p=np.asarray(list(mix.values())) / sum(mix.values()))
    names = [list(mix)[int(k)] for k in kinds]
    items = [world.random_item("unknown" if n == "unknown_ref" else "old", rng) for n in names]
    images, masks = world.render_batch(items, seed=int(rng.integers(2**31)))
    refs = world.references_from_masks(masks, seed=int(rng.integers(2**31)), style=style)
    has_ref = torch.tensor([n != "text" for n in names])
    return items, images, refs, has_ref


def velocity_mixed(
    toy: ToyModel,
    model,
    x: torch.Tensor,
    sigma: torch.Tensor,
    captions: list[str],
    refs: torch.Tensor,
    has_ref: torch.Tensor,
) -> torch.Tensor:
    """Velocities of a batch whose samples have a reference or not (two forwards, one tensor)."""
    v = torch.empty_like(x)
    for group in (has_ref, ~has_ref):
        idx = group.nonzero().flatten()
        if len(idx) == 0:
            continue
        cond = toy.features([captions[i] for i in idx.tolist()])
        if group is has_ref:
            cond = Condition(cond.feats, cond.mask, ref_latents=refs[idx].unsqueeze(1))
        v[idx] = toy.spec.velocity(model, x[idx], sigma[idx], cond)
    return v


# ---- state ----------------------------------------------------------------------------------
def save_state(directory: Path, step: int, model, ema, optimizer, extra: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(directory / "ema.safetensors"))
    optim = {}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        for name, value in optimizer.state.get(p, {}).items():
            optim[f"{i}.{name}"] = torch.as_tensor(value).contiguous()
    save_file(optim, str(directory / "optimizer.safetensors"))
    (directory / "state.json").write_text(json.dumps({"step": step, **extra}), encoding="utf-8")


def load_state(directory: Path, model, ema, optimizer) -> dict:
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    ema.load_state_dict(load_file(str(directory / "ema.safetensors")))
    optim = load_file(str(directory / "optimizer.safetensors"))
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        state = {k.split(".", 1)[1]: v for k, v in optim.items() if k.split(".", 1)[0] == str(i)}
        if state:
            optimizer.state[p] = state
    return json.loads((directory / "state.json").read_text(encoding="utf-8"))


# ---- the loops ------------------------------------------------------------------------------
def _lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _setup(model_dir: Path, lr: float):
    toy = ToyModel.load(model_dir)
    model = toy.model.train()
    ema = toy.spec.load_transformer().eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    return toy, model, ema, optimizer


def _classifier():
    from .classifier import load_classifier

    try:
        return load_classifier()
    except FileNotFoundError:
        return None


def run_phase(
    out: Path,
    toy: ToyModel,
    model,
    ema,
    optimizer,
    loss_fn,
    steps: int,
    minutes: float,
    lr: float,
    ema_decay: float,
    eval_every: int,
    phase: str,
) -> Path:
    """The shared loop of both phases: lr schedule, clipping, EMA, checkpoints, periodic eval."""
    state_dir, log_path = out / "state", out / f"{phase}.jsonl"
    step = load_state(state_dir, model, ema, optimizer)["step"] if (state_dir / "state.json").is_file() else 0
    classifier, t0, deadline = _classifier(), time.perf_counter(), time.time() + 60 * minutes
    while step < steps and time.time() < deadline:
        for g in optimizer.param_groups:
            g["lr"] = _lr(step, steps, lr)
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - ema_decay)
        step += 1
        record = {"step": step, "loss": float(loss), "grad": grad, "s": round(time.perf_counter() - t0, 1)}
        if step % eval_every == 0 or step == steps:
            save_state(state_dir, step, model, ema, optimizer, {"phase": phase})
            if classifier is not None:
                record.update(evaluate(ToyModel(toy.spec, ema, toy.encoder, toy._cache), classifier, in_context=True))
            log.info("%s step %d %s", phase, step, {k: round(v, 4) for k, v in record.items()})
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    save_state(state_dir, step, model, ema, optimizer, {"phase": phase})
    return state_dir


def pretrain(
    out: Path, steps: int, minutes: float, batch: int = 64, lr: float = 1e-3, seed: int = 0, eval_every: int = 250
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model" / "toyworld.json").is_file():
        init_model_dir(out / "model", seed)
    toy, model, ema, optimizer = _setup(out / "model", lr)
    shift = toy.spec.shift

    def loss_fn(step: int) -> torch.Tensor:
        items, x0, refs, has_ref = draw_batch(step, batch, seed, PRETRAIN_MIX, toy.spec.reference_style)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        eps = torch.randn(x0.shape, generator=gen)
        sigma = shift_sigmas(torch.rand(batch, generator=gen), shift)
        x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
        v = velocity_mixed(toy, model, x, sigma, [i.caption for i in items], refs, has_ref)
        return torch.mean((v - (eps - x0)) ** 2)

    run_phase(out, toy, model, ema, optimizer, loss_fn, steps, minutes, lr, 0.999, eval_every, "pretrain")
    return finalize(out, toy, ema)


def load_ema(run: Path, toy: ToyModel):
    ema = toy.spec.load_transformer().eval()
    ema.load_state_dict(load_file(str(run / "state" / "ema.safetensors")))
    return ema


def finalize(out: Path, toy: ToyModel, ema) -> Path:
    """Write the EMA weights as the model directory's transformer."""
    ema.save_pretrained(str(out / "model" / "transformer"), safe_serialization=True)
    return out / "model"


def record_measurements(model_dir: Path, note: str) -> dict:
    """Measure a toy model directory and store the numbers (and how it was made) in its toyworld.json."""
    from .base import read_world, write_world
    from .evaluate import measure_model

    t0 = time.perf_counter()
    measured = measure_model(model_dir)
    measured["seconds"] = round(time.perf_counter() - t0, 1)
    info = read_world(model_dir)
    info["measured"] = measured
    if note:
        info["made_by"] = note
    write_world(model_dir, info)
    log.info("measured %s: %s", model_dir, json.dumps(measured, indent=1))
    return measured


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m dopsd_scale.toyworld.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("pretrain")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=60.0, help="stop (and save) after this wall time")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    d = sub.add_parser("distill")
    d.add_argument("--base", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--steps", type=int, default=500)
    d.add_argument("--minutes", type=float, default=30.0)
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--lr", type=float, default=2e-4)
    d.add_argument("--substeps", type=int, default=8, help="teacher Euler steps per schedule interval")
    d.add_argument("--trajectories", type=int, default=4096, help="teacher trajectories computed once")
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--eval-every", type=int, default=100)
    m = sub.add_parser("measure", help="measure a model directory and record it in its toyworld.json")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--note", default="", help="how the model was made (recorded with the numbers)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.phase == "measure":
        record_measurements(args.model, args.note)
        return
    if args.phase == "pretrain":
        pretrain(args.out, args.steps, args.minutes, args.batch, args.lr, args.seed, args.eval_every)
    else:
        from .distill import distill

        distill(
            args.base,
            args.out,
            args.steps,
            args.minutes,
            args.batch,
            args.lr,
            args.seed,
            args.substeps,
            args.trajectories,
            args.eval_every,
        )


if __name__ == "__main__":
    main()
