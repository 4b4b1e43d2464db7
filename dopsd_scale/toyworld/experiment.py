"""The toy-world comparison: D-OPSD vs SFT vs a live teacher, on the project's real code path.

    dopsd toyworld make-data --out runs/toyworld            # pairs -> make-shards -> cache-features
    dopsd toyworld experiment --out runs/toy_experiment      # every method x seed through `dopsd train`
    dopsd toyworld compare --tuned runs/toyworld/dopsd/export --out runs/toyworld/report

The data: 8 images of the unseen concept (a 5-point star called "zorp", one per colour, on the
three backgrounds), written as a folder of pairs, sharded by `make-shards` and cached by
`cache-features` with the `silhouette_reference` teacher context (and target latents for SFT).
An anchor set of the base's own prompts is cached beside it (text only).

Each run is a `dopsd train` process on `launch/configs/toyworld.yaml` plus the method's and the
sweep's overrides; it checkpoints every `eval_every` steps. Every checkpoint is evaluated the
same way (`evaluate.py`) at the run's seed, and the table holds mean and 95% interval over seeds.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import world

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "launch" / "configs" / "toyworld.yaml"
BASE = Path(__file__).resolve().parent / "assets" / "base"
METHODS = {
    "dopsd": ["objective.kind=dopsd", "teacher.kind=ema"],
    "sft": ["objective.kind=sft"],
    "live": ["objective.kind=dopsd", "teacher.kind=live"],
    "dopsd+anchor": ["objective.kind=dopsd", "teacher.kind=ema"],
    "sft+anchor": ["objective.kind=sft"],
    # restricting which weights train: adapters on the main blocks only (the reference's scale alpha/r = 2)
    "dopsd-lora": ["objective.kind=dopsd", "teacher.kind=ema", "model.finetune=lora", "lora.rank=8", "lora.alpha=16"],
}
DEFAULT_METHODS = ("dopsd", "sft", "live")


# ---- data -----------------------------------------------------------------------------------
def val_prompts() -> list[str]:
    """The validation grid: 8 held-out concept prompts, then 4 of the base's own prompts."""
    concept = [i.caption for i in world.heldout_concept_items()[::2]]
    old = [
        world.known_item(s, c, b).caption
        for s, c, b in (
            ("circle", "red", "white"),
            ("square", "blue", "black"),
            ("triangle", "yellow", "gray"),
            ("cross", "green", "black"),
        )
    ]
    return concept + old


def make_concept_data(out: Path, base: Path = BASE) -> Path:
    """Pairs of the new concept -> image shards -> feature shards (returns the features directory)."""
    from dopsd_data_tools.cache_features import CacheOptions, cache_features
    from dopsd_data_tools.make_shards import ShardOptions, make_shards

    pairs = world.write_pairs(out / "pairs", world.train_concept_items(), seed=0)
    make_shards(
        ShardOptions(str(pairs), str(out / "images"), shard_size=8, buckets=[(16, 16)], min_side=16, processes=1)
    )
    features = out / "features"
    cache_features(
        CacheOptions(
            input_dir=str(out / "images"),
            output_dir=str(features),
            pipeline=str(base),
            latents=True,
            batch_size=8,
            val_prompts=val_prompts(),
        )
    )
    make_anchor_data(out, base)
    write_eval_prompts(out)
    return features


def write_eval_prompts(out: Path) -> None:
    """Prompt files for `dopsd eval`: the new concept on held-out colour/background pairs, and a
    sample of the base's own prompts (retention)."""
    concept = [i.caption for i in world.heldout_concept_items()]
    general = [i.caption for i in world.old_items()[::10]]
    (out / "concept_prompts.txt").write_text("\n".join(concept) + "\n", encoding="utf-8")
    (out / "general_prompts.txt").write_text("\n".join(general) + "\n", encoding="utf-8")


def make_anchor_data(out: Path, base: Path = BASE) -> Path:
    """The anchor set: the base's own 120 prompts (every old shape, colour and background), text only."""
    from dopsd_data_tools.cache_features import CacheOptions, cache_features

    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "anchor_prompts.txt"
    prompts.write_text("\n".join(i.caption for i in world.old_items()) + "\n", encoding="utf-8")
    anchors = out / "anchors"
    cache_features(
        CacheOptions(
            input_dir=str(prompts),
            output_dir=str(anchors),
            pipeline=str(base),
            prompts_only=True,
            buckets=[(16, 16)],
            shard_size=128,
            batch_size=32,
        )
    )
    return anchors


# ---- runs -----------------------------------------------------------------------------------
@dataclass
class Run:
    method: str
    seed: int
    setting: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        extra = "".join(f"_{k.split('.')[-1]}{v}" for k, v in sorted(self.setting.items()))
        return f"{self.method}{extra}_seed{self.seed}"

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in sorted(self.setting.items()))
        return f"{self.method} ({extra})" if extra else self.method


def plan_runs(methods: list[str], seeds: list[int], sweep: dict[str, list[str]]) -> list[Run]:
    keys = sorted(sweep)
    settings = [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))] or [{}]
    return [Run(m, s, st) for m in methods for st in settings for s in seeds]


def train(
    run: Run, out: Path, features: Path, base: Path, steps: int, eval_every: int, extra: Optional[list[str]] = None
) -> Path:
    """One `dopsd train` process; returns the run directory (skips a run that already finished)."""
    run_dir = out / "runs" / run.name
    if (run_dir / "export" / "transformer").is_dir():
        return run_dir
    anchor = [f"anchor.path={features.parent / 'anchors'}"] if run.method.endswith("+anchor") else []
    overrides = [
        *METHODS[run.method],
        *anchor,
        f"model.path={base}",
        f"data.path={features}",
        f"run.output_dir={run_dir}",
        f"run.max_steps={steps}",
        f"run.seed={run.seed}",
        f"data.seed={run.seed}",
        f"checkpoint.every_steps={eval_every}",
        "metrics.val_every=-1",
        *[f"{k}={v}" for k, v in run.setting.items()],
        *(extra or []),
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    cmd = [sys.executable, "-m", "dopsd_scale.cli", "train", "--config", str(CONFIG), *overrides]
    t0 = time.perf_counter()
    with open(out / "runs" / f"{run.name}.log", "w", encoding="utf-8") as logf:
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
    log.info("trained %s in %.0f s", run.name, time.perf_counter() - t0)
    return run_dir


def checkpoints(run_dir: Path) -> dict[int, Path]:
    found = {}
    for path in sorted((run_dir / "checkpoints").glob("step_*")):
        if path.is_dir() and not path.name.endswith(".tmp") and (path / "rank_00000.json").is_file():
            found[int(path.name.split("_")[1])] = path
    return found


def evaluate_checkpoint(base: Path, checkpoint: Optional[Path], classifier, seed: int, cache: dict) -> dict:
    from ..checkpoint import load_student_weights
    from .evaluate import ToyModel, evaluate

    toy = ToyModel.load(base)
    toy._cache = cache
    if checkpoint is not None:
        load_student_weights(toy.model, checkpoint)
    return evaluate(toy, classifier, seed=seed)


# ---- the experiment -------------------------------------------------------------------------
def run_experiment(
    out: Path,
    methods: list[str],
    seeds: list[int],
    steps: int,
    eval_every: int,
    sweep: dict[str, list[str]],
    base: Path = BASE,
) -> dict:
    """Train and evaluate every run; write results.json, table.md and curves.png into `out`."""
    from .classifier import load_classifier
    from .report import write_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    features = out / "data" / "features"
    if not (features / "manifest.json").is_file():
        make_concept_data(out / "data", base)
    classifier, cache = load_classifier(), {}
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
    done = {(r["run"], r["step"]) for r in results["rows"]}
    for seed in seeds:
        if ("base", 0, seed) not in {(r["method"], r["step"], r["seed"]) for r in results["rows"]}:
            record = evaluate_checkpoint(base, None, classifier, seed, cache)
            results["rows"].append(
                {"run": f"base_seed{seed}", "method": "base", "label": "base", "seed": seed, "step": 0, **record}
            )
    t0 = time.perf_counter()
    for run in plan_runs(methods, seeds, sweep):
        run_dir = train(run, out, features, base, steps, eval_every)
        for step, ckpt in checkpoints(run_dir).items():
            if (run.name, step) in done:
                continue
            record = evaluate_checkpoint(base, ckpt, classifier, run.seed, cache)
            results["rows"].append(
                {"run": run.name, "method": run.method, "label": run.label, "seed": run.seed, "step": step, **record}
            )
            log.info("%s step %d: %s", run.name, step, {k: round(v, 3) for k, v in record.items()})
        results_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["settings"] = {
        "methods": methods,
        "seeds": seeds,
        "steps": steps,
        "eval_every": eval_every,
        "sweep": sweep,
        "base": str(base),
        "threads": torch.get_num_threads(),
    }
    results_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    write_report(results, out)
    return results


# ---- before / after -------------------------------------------------------------------------
def compare(tuned: list[Path], out: Path, seeds: list[int], base: Path = BASE) -> dict:
    """Base vs tuned model directories: headline metrics over seeds and before/after grids."""
    from ..stats import format_interval, t_interval
    from .classifier import load_classifier
    from .evaluate import ToyModel, evaluate, generate
    from .report import upscale_grid

    out.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier()
    models = {"base": ToyModel.load(base), **{str(p): ToyModel.load(p) for p in tuned}}
    summary: dict = {}
    for name, toy in models.items():
        records = [evaluate(toy, classifier, seed=s) for s in seeds]
        summary[name] = {k: t_interval([r[k] for r in records]) for k in records[0]}
    concept = [i.caption for i in world.heldout_concept_items()]
    old = [i.caption for i in world.old_items()[::12]]
    for name, captions in (("concept", concept), ("old", old)):
        columns = [
            torch.cat([generate(toy, [c], seed=1000 + i) for i, c in enumerate(captions)]) for toy in models.values()
        ]
        upscale_grid(columns).save(out / f"before_after_{name}.png")
    lines = [
        "| model | new concept | old prompts (shape) | Frechet dist. (old) | sharpness / palette (old) |",
        "|---|---|---|---|---|",
    ]
    for name, m in summary.items():
        lines.append(
            f"| {name} | {format_interval(*m['concept_shape'])} | {format_interval(*m['old_shape'])} | "
            f"{format_interval(*m['old_frechet'], digits=1)} | {m['old_sharpness'][0]:.3f} / "
            f"{m['old_palette'][0]:.3f} |"
        )
    text = "\n".join(lines) + f"\n\nmean ± 95% interval over generation seeds {seeds}\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(text)
    return summary
