"""One-shot GPU check: kernel correctness on CUDA, attention speed against every SDPA back-end, and
the D-OPSD step's speed, MFU and peak memory for K = 1, 2, 4, 8 on the largest Z-Image DiT that fits.

    bash launch/gpu_check.sh [OUT]                        # one GPU, about 10 minutes on an H100/H200
    python -m dopsd_scale.gpu_check --smoke --out DIR     # CPU, tiny sizes (the test suite runs it)

Only torch and triton are needed for the kernel parts. The D-OPSD part builds the diffusers Z-Image
transformer: without diffusers it installs it from `$DOPSD_WHEELS` with `pip --no-index`, else it is
marked skipped; it never stops the other parts. The folder needs the wheels of diffusers and of
whichever of its dependencies the machine lacks; both are pure Python, so `pip download --no-deps -d
wheels diffusers==0.42.1 importlib_metadata` (6 MB) works from any machine. That was enough in an
environment like a bare GPU image (Python 3.12, torch 2.11+cu130, triton 3.6, transformers,
huggingface_hub, numpy, Pillow; no ray, deepspeed, webdataset or omegaconf), where `--smoke` then
ran every part except `kernel_sanity`. That part failed only because triton 3.6's interpreter cannot
run the attention kernel; on a GPU the kernel is compiled. Every part writes `OUT/gpu_check.json`
(and `OUT/gpu_check.md`) when it ends, so a timeout keeps what finished; the parts stop starting new
work when `--budget-s` runs out.

Parts, in order (the kernel parts first: they need nothing else): `kernel_tests` (pytest
tests/kernels on CUDA, when pytest is installed; a collection-only run in smoke mode),
`kernel_sanity` (our attention against the fp32 reference, forward and input gradients, beside
torch SDPA's own error in the same dtype), `attention` (`kernels/bench.py` at Z-Image shapes:
TFLOP/s of our kernel, every SDPA back-end and flash-attn), `dopsd_step` (random weights, bf16
autocast over fp32 masters, gradient checkpointing, fused AdamW, fp32 EMA teacher, 1024^2,
captions of 256 (student) and 1024 (teacher) tokens, our Triton attention; Z-Image-Turbo's width
and the most layers that fit).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
ZIMAGE_TURBO = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    cap_feat_dim=2560,
    axes_dims=[32, 48, 48],
    axes_lens=[1024, 512, 512],
)
SMOKE = dict(
    ZIMAGE_TURBO,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=32,
    axes_dims=[8, 12, 12],
    axes_lens=[256, 64, 64],
)
BYTES_PER_PARAM = 24
"""fp32 master weight + gradient + AdamW's two moments + fp32 EMA teacher + autocast's bf16 copy."""
ATTENTION_SHAPES = [(1, 30, 4352), (2, 30, 4864)]
"""Z-Image at 1024^2: 4096 image tokens + a caption padded to 32 (256 .. 768 tokens)."""


class Report:
    """The results so far, rewritten (JSON and markdown) after every part."""

    def __init__(self, out: pathlib.Path, smoke: bool, budget_s: float):
        self.out, self.start, self.budget_s = out, time.monotonic(), budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"smoke": smoke, "environment": _environment(), "parts": {}}

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def add(self, part: str, result: dict) -> None:
        self.data["parts"][part] = {**result, "elapsed_s": round(time.monotonic() - self.start, 1)}
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str), encoding="utf-8")
        tmp.replace(self.out / "gpu_check.json")
        (self.out / "gpu_check.md").write_text(to_markdown(self.data), encoding="utf-8")


def _environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1))
    for name in ("triton", "diffusers", "flash_attn"):
        spec = importlib.util.find_spec(name)
        env[name] = None if spec is None else getattr(importlib.import_module(name), "__version__", "?")
    return env


def load_kernels():
    """`dopsd_kernels`, installed or loaded from the repository's `kernels/` folder."""
    if importlib.util.find_spec("dopsd_kernels") is None:
        folder = REPO / "kernels"
        spec = importlib.util.spec_from_file_location(
            "dopsd_kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["dopsd_kernels"] = module
        spec.loader.exec_module(module)
    return importlib.import_module("dopsd_kernels")


# ---- kernels ----------------------------------------------------------------------------------------
def kernel_tests(smoke: bool, timeout_s: float) -> dict:
    """pytest on tests/kernels in a subprocess (GPU: bf16 tolerances tied to torch's own error)."""
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed (kernel_sanity still checks the kernels)"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--confcutdir=tests/kernels",
        "tests/kernels",
        *(["--collect-only"] if smoke else []),
    ]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(10.0, timeout_s))
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    return {
        "ok": done.returncode == 0,
        "summary": lines[-1] if lines else done.stderr[-500:],
        "tail": "\n".join(lines[-15:]),
    }


def kernel_sanity(kernels, device: torch.device) -> dict:
    """Max error of our kernels (forward and input gradients) against fp32 references, beside
    SDPA's own error in the same dtype: a ratio near 1 or below is as good as torch."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, h, n, d = (2, 4, 300, 128) if device.type == "cuda" else (2, 2, 40, 32)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, generator=gen) for _ in range(3))
    lens = torch.tensor([n, n * 2 // 3], device=device)
    ref_out, ref_grads = _attention_grads(lambda *t: kernels.attention_reference(*t, kv_lens=lens), q, k, v)
    keep = (torch.arange(n, device=device)[None, :] < lens[:, None])[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = {}
    for name, fn in (
        ("triton", lambda *t: kernels.flash_attention(*t, kv_lens=lens)),
        ("sdpa", lambda *t: sdpa(*t, attn_mask=keep)),
    ):
        out, grads = _attention_grads(fn, *(t.to(dtype) for t in (q, k, v)))
        rows[name] = {
            "out": _max_err(out, ref_out, lens),
            "grads": max(_max_err(g, r, lens) for g, r in zip(grads, ref_grads)),
        }
    worst = max(rows["triton"][key] / max(rows["sdpa"][key], 1e-12) for key in ("out", "grads"))
    return {"dtype": str(dtype), "shape": [b, h, n, d], "max_abs_err": rows, "worst_ratio_to_sdpa": worst}


def _attention_grads(fn, q, k, v):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return out.float(), [g.float() for g in grads]


def _max_err(a: torch.Tensor, b: torch.Tensor, lens: torch.Tensor) -> float:
    """Over valid query rows only (padded rows' values are undefined)."""
    valid = torch.arange(a.shape[2], device=a.device)[None, :] < lens[:, None]
    return float((a - b).abs()[valid[:, None, :, None].expand_as(a)].max())


def attention_speed(kernels, report: Report) -> dict:
    bench = importlib.import_module("dopsd_kernels.bench")
    rows = []
    for shape in ATTENTION_SHAPES:
        if report.left_s() < 240:  # keep about 3 minutes for the D-OPSD step
            rows.append({"shape": list(shape), "note": "skipped: time budget spent"})
            continue
        rows += bench.bench_attention(kernels, [shape], lengths=_caption_lengths)
    return {"rows": rows, "note": "TFLOP/s on valid tokens; bwd = 2.5 x fwd FLOPs"}


def _caption_lengths(batch: int, length: int, device) -> torch.Tensor:
    """4096 image tokens plus captions of different lengths (the longest fills the batch)."""
    image = 4096 if length > 4096 else length // 2
    caps = torch.linspace(length - image, (length - image) // 3, batch).round() if batch > 1 else [length - image]
    return (image + torch.as_tensor(caps)).to(torch.int32).to(device)


# ---- the D-OPSD step ------------------------------------------------------------------------------
def ensure_diffusers() -> str | None:
    """None when diffusers imports (installing it from `$DOPSD_WHEELS` if needed); else why not."""
    if importlib.util.find_spec("diffusers") is None:
        wheels = os.environ.get("DOPSD_WHEELS")
        if not wheels:
            return (
                "diffusers is not installed: set DOPSD_WHEELS to a folder holding its wheel and dependencies "
                "(pip download --no-deps -d wheels diffusers==0.42.1 importlib_metadata) or pip install it"
            )
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, "diffusers"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        importlib.invalidate_caches()
        if done.returncode != 0:
            return f"installing diffusers from {wheels} failed: {(done.stderr or done.stdout)[-500:]}"
    try:
        importlib.import_module("diffusers")
    except Exception as err:  # a missing dependency of diffusers shows up here
        return f"diffusers does not import: {type(err).__name__}: {err}"
    return None


def fit_depth(device: torch.device) -> tuple[dict, dict]:
    """Z-Image-Turbo's width with the most main layers whose training state (`BYTES_PER_PARAM` per
    weight) plus a reserve for activations at 1024^2 fits in 92% of the GPU's memory."""
    from diffusers import ZImageTransformer2DModel

    counts = []
    for layers in (1, 2):
        with torch.device("meta"):
            model = ZImageTransformer2DModel(**dict(ZIMAGE_TURBO, n_layers=layers))
        counts.append(sum(p.numel() for p in model.parameters()))
    per_layer, base = counts[1] - counts[0], 2 * counts[0] - counts[1]
    total, reserve = torch.cuda.get_device_properties(device).total_memory, 16 * 2**30
    layers = int((0.92 * total - reserve - BYTES_PER_PARAM * base) // (BYTES_PER_PARAM * per_layer))
    layers = max(1, min(ZIMAGE_TURBO["n_layers"], layers))
    estimate = {
        "params_per_layer": per_layer,
        "params_outside_layers": base,
        "reserve_gib": reserve / 2**30,
        "bytes_per_param": BYTES_PER_PARAM,
        "gpu_gib": total / 2**30,
    }
    return dict(ZIMAGE_TURBO, n_layers=layers), estimate


def build_step(cfg: dict, device: torch.device, smoke: bool):
    """The model (random weights everywhere), its spec, EMA teacher, optimizer and conditions."""
    from diffusers import ZImageTransformer2DModel

    from .attention import apply_attention_backend, resolve_backend
    from .models.spec import Condition
    from .models.zimage import ZImageSpec

    folder = pathlib.Path(tempfile.mkdtemp(prefix="gpu-check-"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel", **cfg}))
    spec = ZImageSpec(folder)
    torch.manual_seed(0)
    with torch.device(device):
        model = ZImageTransformer2DModel(**cfg)
    with torch.no_grad():  # diffusers zero-initialises some output layers
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    backend = resolve_backend("auto", device, spec.attention_backends)
    if backend == "triton":
        try:
            load_kernels()  # the processor imports dopsd_kernels at its first call
        except Exception:  # the kernel parts report why
            backend = "sdpa"
    apply_attention_backend(model, backend)
    model.enable_gradient_checkpointing()
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")
    lengths = (16, 32) if smoke else (256, 1024)
    conds = [
        Condition(
            torch.randn(1, n, cfg["cap_feat_dim"], device=device, dtype=torch.bfloat16),
            torch.ones(1, n, dtype=torch.bool, device=device),
        )
        for n in lengths
    ]
    return spec, model.train(), teacher, opt, conds, backend


def measure_k(parts, k: int, device: torch.device, smoke: bool, steps: int = 2) -> dict:
    """s/step, model TFLOP/s, MFU and peak memory of D-OPSD steps with K roll-out steps."""
    import contextlib

    from .flow import schedule
    from .objectives.dopsd import DOPSDObjective

    spec, model, teacher, opt, (student_cond, teacher_cond), _ = parts
    size = 128 if smoke else 1024
    shape = spec.latent_shape(size, size)
    objective = DOPSDObjective(schedule(spec.train_sigmas(k, shape)), "x0", "all", per_step_backward=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def velocity(net, cond):
        def fn(x, sigma):
            with autocast:
                return spec.velocity(net, x, sigma, cond)

        return fn

    def step():
        opt.zero_grad(set_to_none=True)
        objective(velocity(model, student_cond), velocity(teacher, teacher_cond), torch.randn(1, *shape, device=device))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(teacher.parameters()), list(model.parameters()), 1e-4)

    step()  # warm-up: AdamW's state, autotuning
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    f_s = spec.flops_per_forward(model, shape, student_cond.feats.shape[1])
    f_t = spec.flops_per_forward(model, shape, teacher_cond.feats.shape[1])
    flops = k * (3 * f_s + f_t)
    return {
        "k": k,
        "s_per_step": seconds,
        "model_tflops_per_s": flops / seconds / 1e12,
        "mfu": _mfu(flops / seconds / 1e12, device),
        "hw_tflops_per_s": k * (4 * f_s + f_t) / seconds / 1e12,  # with the checkpointed forward again
        "peak_gib": _peak_gib(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _mfu(tflops: float, device: torch.device):
    from .metrics import device_peak_tflops

    peak = device_peak_tflops(device)
    return None if not peak else tflops / peak


def dopsd_step(report: Report, device: torch.device, smoke: bool) -> dict:
    """The step for each K on the deepest model that fits (a quarter shallower after an OOM)."""
    problem = ensure_diffusers()
    if problem:
        return {"skipped": problem}
    cfg, estimate = (SMOKE, {}) if smoke else fit_depth(device)
    for _attempt in range(3):
        result = {
            "config": cfg,
            "estimate": estimate,
            "resolution": 128 if smoke else 1024,
            "note": "model FLOPs as the trainer counts them (fwd = F, fwd+bwd = 3F; recompute not counted)",
            "rows": [],
        }
        try:
            parts = build_step(cfg, device, smoke)
            result["params_b"] = sum(p.numel() for p in parts[1].parameters()) / 1e9
            result["attention_backend"] = parts[5]
            for k in (1, 2) if smoke else (1, 2, 4, 8):
                if report.left_s() < 20 * k:
                    result["rows"].append({"k": k, "note": "skipped: time budget spent"})
                    continue
                result["rows"].append(measure_k(parts, k, device, smoke))
                report.add("dopsd_step", result)
            return result
        except torch.OutOfMemoryError as err:
            estimate = {**estimate, f"oom_at_{cfg['n_layers']}_layers": str(err).splitlines()[0]}
            cfg = dict(cfg, n_layers=max(1, cfg["n_layers"] * 3 // 4))
        parts = None  # (outside the except: its traceback held the model)
        gc.collect()
        torch.cuda.empty_cache()
    return {"error": "out of memory at every depth tried", "estimate": estimate}


# ---- the report ---------------------------------------------------------------------------------------
def to_markdown(data: dict) -> str:
    env = data["environment"]
    lines = [
        f"# GPU check{' (CPU smoke run)' if data['smoke'] else ''}",
        "",
        ", ".join(f"{k}: {v}" for k, v in env.items()),
        "",
    ]
    for name, part in data["parts"].items():
        lines += [f"## {name}", ""]
        rows = part.get("rows")
        if rows:
            keys = list(dict.fromkeys(key for row in rows for key in row))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(key)) for key in keys) + " |" for row in rows]
            lines.append("")
        lines += [f"- {key}: {_cell(value)}" for key, value in part.items() if key not in ("rows", "tail")]
        lines.append("")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "/").replace("\n", " ")


def _run(report: Report, name: str, fn) -> None:
    """Run one part; an error is recorded and the next part runs."""
    print(f"gpu_check: {name} ...", flush=True)
    try:
        result = fn()
    except Exception as err:  # one part failing must not lose the others
        import traceback

        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    report.add(name, result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on a CPU (Triton interpreter)")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting new work after this")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA device (use --smoke for the tiny CPU run)")
        return 2
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    device = torch.device("cuda" if cuda else "cpu")
    report = Report(pathlib.Path(args.out), args.smoke, args.budget_s)
    holder: dict = {}
    _run(report, "kernel_tests", lambda: kernel_tests(args.smoke, min(240.0, report.left_s() - 300)))
    _run(report, "kernel_sanity", lambda: kernel_sanity(holder.setdefault("k", load_kernels()), device))
    _run(
        report,
        "attention",
        lambda: (
            attention_speed(holder.setdefault("k", load_kernels()), report)
            if cuda
            else {"skipped": "needs CUDA (triton.testing.do_bench)"}
        ),
    )
    _run(report, "dopsd_step", lambda: dopsd_step(report, device, args.smoke))
    print(to_markdown(report.data))
    print(f"gpu_check: wrote {report.out / 'gpu_check.json'} and gpu_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
