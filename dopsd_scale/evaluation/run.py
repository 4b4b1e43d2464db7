"""The two procedures: `precheck` (will it work?) and `evaluate` (did it work?).

precheck: on the first samples of the feature shards, the model rolls out twice from the same noise
on its few-step schedule, once on the prompt (the student) and once on the cached teacher context;
both results are compared with the target image. D-OPSD distils the gap: when the teacher's
result is no closer to the target than the student's, training has nothing to distil, and that is
cheaper to learn before a cluster run than after.

evaluate: base and tuned models generate every prompt of every set at every seed (see `generate`);
then, per seed, each metric is computed over the prompts (see `metrics`), and the report shows the
mean over seeds with its 95% t interval. The interval covers seed variance only, not the choice of
prompts or reference images. Metric values are computed from the PNGs on disk, so a resumed run
scores exactly what a single run would.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from ..stats import t_interval
from . import metrics as M
from .encoders import PixelEncoder, load_encoder
from .generate import ModelRef, generate_all, list_images, load_generated, read_image, resolve_tuned

log = logging.getLogger(__name__)
GRID_ROWS = 16
"""Samples shown in the precheck grid (all of them are measured)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def summarize(values: list[float]) -> dict:
    """Per-seed values -> mean, half width of the 95% interval (None for one seed), n."""
    mean, half = t_interval(values)
    return {"per_seed": values, "mean": mean, "half": half if len(values) > 1 else None, "n": len(values)}


def read_prompts(path: Optional[str], flag: str) -> list[str]:
    """One prompt per line; empty lines and lines starting with # are skipped."""
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"{flag} {path}: no prompts in the file")
    return prompts


# ---- precheck ------------------------------------------------------------------------------------
@dataclass
class PrecheckOptions:
    model: str
    data: str
    out: str
    manifest: Optional[str] = None
    encoder: Optional[str] = None
    checkpoint: Optional[str] = None
    weights: str = "student"
    samples: int = 16
    steps: Optional[int] = None
    seed: int = 0
    batch_size: int = 4
    device: Optional[str] = None
    model_name: str = "auto"


@torch.no_grad()
def precheck(opts: PrecheckOptions) -> dict:
    """Student vs teacher roll-outs against the targets; writes precheck.json and precheck_grid.png."""
    from ..checkpoint import load_student_weights
    from ..data.format import FeatureFormatError, Manifest
    from ..models import detect_spec_name, get_spec
    from ..validation import batch_samples, branch_noise, images_to_grid, read_samples, rollout_branches
    from .report import precheck_verdict

    device = opts.device or default_device()
    if not Path(opts.model).is_dir():
        raise FileNotFoundError(f"--model {opts.model}: no such directory")
    encoder = load_encoder(opts.encoder, "--encoder", device) if opts.encoder else None
    spec = get_spec(detect_spec_name(opts.model) if opts.model_name == "auto" else opts.model_name, opts.model)
    try:
        manifest = Manifest.load(opts.manifest or opts.data)
        samples = read_samples(opts.data, opts.samples, opts.manifest)
    except FeatureFormatError as err:
        raise ConfigError(f"--data {opts.data}: {err}") from None
    if not samples:
        raise ConfigError(f"--data {opts.data}: no readable samples in the feature shards")
    if not manifest.producer.get("latents") or any("latents" not in s.tensors for s in samples):
        raise ConfigError(
            f"--data {opts.data}: the feature shards hold no target latents; precheck compares "
            "roll-outs with the target image: cache them with `dopsd cache-features --latents`"
        )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = spec.load_transformer(torch.float32 if opts.checkpoint else dtype)
    if opts.checkpoint:
        load_student_weights(model, opts.checkpoint, which=opts.weights)
        model = model.to(dtype)
    model = model.to(device).eval()
    if spec.feature_dim(model) != manifest.feature_dim:
        raise ConfigError(
            f"--data {opts.data}: features are {manifest.feature_dim} wide, the model reads {spec.feature_dim(model)}"
        )
    steps = opts.steps or spec.sample_steps
    measures: dict[str, dict[str, list[float]]] = {}
    rows, done = [], 0
    for batch in batch_samples(samples, opts.batch_size):
        noise = branch_noise(spec, batch.bucket, len(batch), opts.seed, first=done)
        student, teacher = rollout_branches(spec, model, batch, steps, noise, torch.device(device))
        target = batch.latents
        images = [spec.to_images(z.to(device), device).float().cpu() for z in (target, student, teacher)]
        _add_distances(measures, "latent MSE", *_latent_mse(target, student.cpu(), teacher.cpu()))
        _add_distances(measures, "pixel MSE", *(M.mse_psnr(x, images[0])[0].tolist() for x in images[1:]))
        if encoder is not None:
            feats = [encoder.encode_images(list(x)) for x in images]
            dists = (M.pair_distance(f, feats[0]).tolist() for f in feats[1:])
            _add_distances(measures, f"{encoder.name} 1-cos", *dists)
        keep = max(0, GRID_ROWS - len(rows))  # the grid shows the first samples, at most 256 px
        rows += [M.fit_square(list(triple), min(256, *triple[0].shape[-2:])) for triple in zip(*images)][:keep]
        done += len(batch)
    primary = f"{encoder.name} 1-cos" if encoder is not None else "pixel MSE"
    results = {
        "model": str(opts.model),
        "checkpoint": opts.checkpoint,
        "data": str(opts.data),
        "samples": done,
        "steps": steps,
        "seed": opts.seed,
        "encoder": encoder.describe() if encoder is not None else None,
        "primary": primary,
        "measures": {name: _compare(d["student"], d["teacher"]) for name, d in measures.items()},
    }
    results["verdict"] = precheck_verdict(results["measures"][primary], primary)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    size = min(r.shape[-1] for r in rows)
    grid = images_to_grid(M.fit_square([x for r in rows for x in r], size), columns=3)
    grid.save(out / "precheck_grid.png")
    (out / "precheck.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    results["grid"] = str(out / "precheck_grid.png")
    return results


def _latent_mse(target: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> tuple[list, list]:
    return [(x.float() - target.float()).square().flatten(1).mean(1).tolist() for x in (student, teacher)]


def _add_distances(measures: dict, name: str, student: list[float], teacher: list[float]) -> None:
    entry = measures.setdefault(name, {"student": [], "teacher": []})
    entry["student"] += student
    entry["teacher"] += teacher


def _compare(student: list[float], teacher: list[float]) -> dict:
    """Distances to the target (lower = closer) of both branches, and the teacher's lead per sample."""
    lead = [s - t for s, t in zip(student, teacher)]
    s_mean, s_half = t_interval(student)
    t_mean, t_half = t_interval(teacher)
    l_mean, l_half = t_interval(lead)
    return {
        "student": [s_mean, s_half],
        "teacher": [t_mean, t_half],
        "lead": [l_mean, l_half],
        "relative_lead": l_mean / s_mean if s_mean > 0 else 0.0,
        "teacher_closer": sum(v > 0 for v in lead),
        "n": len(lead),
        "per_sample": {"student": student, "teacher": teacher},
    }


# ---- evaluate ------------------------------------------------------------------------------------
@dataclass
class EvalOptions:
    base: str
    out: str
    tuned: list[str] = field(default_factory=list)
    concept_prompts: Optional[str] = None
    general_prompts: Optional[str] = None
    targets: Optional[str] = None
    reference: Optional[str] = None
    clip: Optional[str] = None
    dino: Optional[str] = None
    fd_encoder: str = "auto"
    placeholder: Optional[str] = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    batch_size: int = 8
    dtype: str = "auto"
    device: Optional[str] = None
    workers: int = 0
    ray_address: Optional[str] = None
    weights: str = "student"
    model_name: str = "auto"
    quality_size: int = 256
    kid_subsets: int = 100
    grid_prompts: int = 8
    retries: int = 1


def evaluate(opts: EvalOptions) -> dict:
    """Generate what is missing, score it, write results.json and report.html; returns the results."""
    from .report import write_report

    device = opts.device or default_device()
    if not Path(opts.base).is_dir():
        raise FileNotFoundError(f"--base {opts.base}: no such directory")
    given = (
        ("concept", opts.concept_prompts, "--concept-prompts"),
        ("general", opts.general_prompts, "--general-prompts"),
    )
    sets = {name: read_prompts(path, flag) for name, path, flag in given if path}
    if not sets:
        raise ConfigError("give --concept-prompts and/or --general-prompts (text files, one prompt per line)")
    if not opts.seeds:
        raise ConfigError("--seeds: give at least one seed")
    models = [ModelRef("base", str(opts.base), None, opts.weights, opts.model_name)] + _tuned(opts)
    scorer = Scorer.build(opts, device)  # encoders and folders first: a wrong path fails before generating
    gen_opts = {
        "out": str(opts.out),
        "device": device,
        "dtype": opts.dtype,
        "steps": opts.steps,
        "height": opts.height,
        "width": opts.width,
        "batch_size": opts.batch_size,
    }
    counts = generate_all(models, sets, list(opts.seeds), gen_opts, opts.workers, opts.ray_address, opts.retries)
    values: dict = {name: {} for name in sets}
    for name, prompts in sets.items():
        text = scorer.text_features(prompts)
        for seed in opts.seeds:
            views = {m.name: scorer.view(load_generated(opts.out, m.name, name, seed, prompts)) for m in models}
            for key, per_model in scorer.score_seed(name, views, text).items():
                for model, value in per_model.items():
                    values[name].setdefault(key, {}).setdefault(model, []).append(value)
    results = {
        "version": 1,
        "options": asdict(opts),
        "device": device,
        "seeds": list(opts.seeds),
        "models": {m.name: asdict(m) for m in models},
        "sets": sets,
        "generation": counts,
        "encoders": scorer.describe(),
        "metric_info": scorer.info,
        "target_images": scorer.target_paths,
        "metrics": {
            name: {key: {model: summarize(v) for model, v in per_model.items()} for key, per_model in per_set.items()}
            for name, per_set in values.items()
        },
        "notes": scorer.notes
        + [
            "Intervals: 95% Student-t over seeds (per seed, each metric is computed over "
            "all prompts of the set); they cover seed variance only, not the choice of prompts."
        ],
    }
    out = Path(opts.out)
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    results["report"] = str(write_report(results, out, opts.grid_prompts))
    return results


def _tuned(opts: EvalOptions) -> list[ModelRef]:
    refs, names = [], {"base"}
    for text in opts.tuned:
        ref = resolve_tuned(text, opts.base, opts.weights, opts.model_name)
        name, k = ref.name, 2
        while name in names:
            name, k = f"{ref.name}-{k}", k + 1
        names.add(name)
        refs.append(ModelRef(name, ref.path, ref.checkpoint, ref.weights, ref.model_name))
    return refs


def _placeholder(text: Optional[str]) -> Optional[tuple[str, str]]:
    if not text:
        return None
    token, sep, word = text.partition("=")
    if not sep or not token:
        raise ConfigError(f"--placeholder {text!r}: expected TOKEN=WORD (WORD may be empty), e.g. 'sks=dog'")
    return token, word


class Scorer:
    """Every metric of every model for one prompt set and seed, from the images (see `metrics`).

    Encoders: DINOv2 and/or CLIP when their paths are given, else pixels. FD/KID use one of them
    (`--fd-encoder`); retention uses the first (DINOv2, then CLIP, then pixels). Quality (sharpness
    and colour) compares with the reference folder (concept set; else the targets) or with the base
    model's images from the same noise (general set, or no folder).
    """

    QUALITY_REFERENCE_MAX = 256  # reference images kept at quality_size for sharpness and colour

    def __init__(self, opts: EvalOptions, encoders: list, clip, fd_encoder):
        self.opts, self.encoders, self.clip, self.fd = opts, encoders, clip, fd_encoder
        self.placeholder = _placeholder(opts.placeholder)
        self.info: dict[str, dict] = {}
        self.notes: list[str] = []
        self.target_paths: list[str] = []
        self.targets: Optional[dict] = None
        self.reference: Optional[dict] = None
        if opts.targets:
            paths = list_images(opts.targets, "--targets")
            self.target_paths = [str(p) for p in paths]
            self.targets = self._folder(paths, self.encoders)
        if opts.reference:
            self.reference = self._folder(list_images(opts.reference, "--reference"), [self.fd])
        self._describe_metrics()

    @classmethod
    def build(cls, opts: EvalOptions, device: str) -> Scorer:
        clip = load_encoder(opts.clip, "--clip", device, need_text=True) if opts.clip else None
        dino = load_encoder(opts.dino, "--dino", device) if opts.dino else None
        encoders = [e for e in (dino, clip) if e is not None] or [PixelEncoder()]
        pixel = encoders[0] if encoders[0].name == "pixel" else PixelEncoder()
        choice = {"auto": encoders[0], "dino": dino, "clip": clip, "pixel": pixel}[opts.fd_encoder]
        if choice is None:
            raise ConfigError(f"--fd-encoder {opts.fd_encoder} needs --{opts.fd_encoder} PATH")
        return cls(opts, encoders, clip, choice)

    def describe(self) -> dict:
        return {
            "image": [e.describe() for e in self.encoders],
            "fd": self.fd.describe(),
            "clip": self.clip.describe() if self.clip else None,
        }

    # ---- features ------------------------------------------------------------------------------
    def _all_encoders(self) -> list:
        return self.encoders + ([self.fd] if self.fd not in self.encoders else [])

    def _folder(self, paths: list, encoders: list, chunk: int = 32) -> dict:
        """Features of every image (read chunk by chunk) and quality squares of an even subset."""
        spread = torch.linspace(0, len(paths) - 1, min(len(paths), self.QUALITY_REFERENCE_MAX))
        keep = set(spread.round().long().tolist())
        feats: dict[str, list] = {e.name: [] for e in encoders}
        squares = []
        for start in range(0, len(paths), chunk):
            images = [read_image(p) for p in paths[start : start + chunk]]
            for e in encoders:
                feats[e.name].append(e.encode_images(images))
            squares += [M.fit_square([x], self.opts.quality_size) for i, x in enumerate(images, start) if i in keep]
        return {"feats": {k: torch.cat(v) for k, v in feats.items()}, "squares": torch.cat(squares), "n": len(paths)}

    def view(self, images: list[torch.Tensor]) -> dict:
        """What the metrics need of a model's images for one set and seed (the images can go)."""
        return {
            "feats": {e.name: e.encode_images(images) for e in self._all_encoders()},
            "squares": M.fit_square(images, self.opts.quality_size),
            "n": len(images),
        }

    def text_features(self, prompts: list[str]) -> Optional[torch.Tensor]:
        if self.clip is None:
            return None
        if self.placeholder:
            token, word = self.placeholder
            prompts = [" ".join(p.replace(token, word).split()) for p in prompts]
        return self.clip.encode_text(prompts)

    # ---- metrics -------------------------------------------------------------------------------
    def score_seed(self, set_name: str, views: dict[str, dict], text: Optional[torch.Tensor]) -> dict:
        """{metric key: {model: value}} for one seed; "base" comes first in `views`."""
        out: dict[str, dict[str, float]] = {}

        def put(key: str, model: str, value) -> None:
            out.setdefault(key, {})[model] = float(value)

        primary = self.encoders[0].name
        for model, v in views.items():
            if text is not None:
                put("clip_score", model, M.clip_score(text, v["feats"]["CLIP"]).mean())
            if set_name == "concept":
                self._concept(v, model, put)
            ref = self._quality_reference(set_name, views)
            if ref is not None and not (ref is views["base"]["squares"] and model == "base"):
                put("sharpness", model, M.sharpness_log_ratio(v["squares"], ref))
                put("colour_swd", model, M.colour_swd(v["squares"], ref))
            if model == "base":
                continue
            if text is not None:
                put("delta_clip_score", model, out["clip_score"][model] - out["clip_score"]["base"])
            if set_name == "general":
                base = views["base"]
                put(f"retention_{primary}", model, M.pair_distance(v["feats"][primary], base["feats"][primary]).mean())
                put("retention_psnr", model, M.mse_psnr(v["squares"], base["squares"])[1].mean())
        return out

    def _concept(self, v: dict, model: str, put) -> None:
        if self.targets is not None:
            for e in self.encoders:
                similarity = M.mean_similarity(v["feats"][e.name], self.targets["feats"][e.name])
                put(f"fidelity_{e.name}", model, similarity.mean())
        if self.reference is not None and v["n"] >= 2:
            ref = self.reference["feats"][self.fd.name]
            put(f"FD_{self.fd.name}", model, M.frechet_distance(v["feats"][self.fd.name], ref))
            put(f"KID_{self.fd.name}", model, M.kid(v["feats"][self.fd.name], ref, self.opts.kid_subsets)[0])

    def _quality_reference(self, set_name: str, views: dict) -> Optional[torch.Tensor]:
        if set_name == "concept" and self.reference is not None:
            return self.reference["squares"]
        if set_name == "concept" and self.targets is not None:
            return self.targets["squares"]
        return views["base"]["squares"]

    def _describe_metrics(self) -> None:
        """What each key means and which way is better (for results.json and the report)."""

        def define(key: str, better: str, text: str) -> None:
            self.info[key] = {"better": better, "definition": text}

        fd, first = self.fd.name, self.encoders[0].name
        qref = (
            "the --reference folder"
            if self.reference
            else "the --targets images"
            if self.targets
            else "the base model's images"
        ) + " (concept set); the base model's images, same noise (general set)"
        if self.clip is not None:
            define(
                "clip_score", "higher", "prompt alignment: 100 * max(cos(CLIP text, CLIP image), 0), mean over prompts"
            )
            define("delta_clip_score", "higher", "CLIP score minus the base model's, same prompts and noise")
        else:
            self.notes.append("No --clip: no CLIP score (prompt alignment).")
        for e in self.encoders:
            define(
                f"fidelity_{e.name}",
                "higher",
                f"concept fidelity: mean cosine of each image to every target image, {e.name} features",
            )
        if self.targets is None:
            self.notes.append("No --targets: no concept fidelity.")
        define(
            f"FD_{fd}",
            "lower",
            f"Fréchet distance to the reference folder in {fd} features (not FID: not "
            "Inception features); biased upward at small N, compare models at the same N only",
        )
        define(
            f"KID_{fd}",
            "lower",
            f"kernel distance (unbiased MMD^2, cubic kernel) to the reference folder in {fd} "
            "features; about 0 for the same distribution, may be slightly negative",
        )
        if self.reference is None:
            self.notes.append("No --reference: no domain distance (FD, KID).")
        define(
            "sharpness",
            "closer to 0",
            f"log(Laplacian variance of luma / that of {qref}) at "
            f"{self.opts.quality_size} px: < 0 blurrier; read with colour_swd",
        )
        define(
            "colour_swd",
            "lower",
            f"sliced W1 distance of pixel colours to {qref}: noise raises sharpness and this together",
        )
        define(f"retention_{first}", "lower", f"1 - cos({first}) of the tuned image and the base's, same noise")
        define("retention_psnr", "higher", "PSNR (dB) of the tuned image against the base's, same noise")
