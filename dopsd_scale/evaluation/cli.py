"""`dopsd precheck` and `dopsd eval`: registered on the main parser by `add_eval_subcommands`.

Encoder weights come from local paths given by flags (--encoder, --clip, --dino); there are no hub
defaults and nothing downloads. A wrong path stops with one line naming the flag.
"""

from __future__ import annotations

import argparse


def _seeds(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_precheck(args: argparse.Namespace) -> None:
    from .report import format_precheck
    from .run import PrecheckOptions, precheck

    results = precheck(
        PrecheckOptions(
            model=args.model,
            data=args.data,
            out=args.out,
            manifest=args.manifest,
            encoder=args.encoder,
            checkpoint=args.checkpoint,
            weights=args.weights,
            samples=args.samples,
            steps=args.steps,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            model_name=args.model_name,
        )
    )
    print(format_precheck(results))


def cmd_eval(args: argparse.Namespace) -> None:
    from .run import EvalOptions, evaluate

    opts = EvalOptions(
        base=args.base,
        out=args.out,
        tuned=args.tuned or [],
        concept_prompts=args.concept_prompts,
        general_prompts=args.general_prompts,
        targets=args.targets,
        reference=args.reference,
        clip=args.clip,
        dino=args.dino,
        fd_encoder=args.fd_encoder,
        placeholder=args.placeholder,
        seeds=args.seeds,
        steps=args.steps,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        workers=args.workers,
        ray_address=args.ray_address,
        weights=args.weights,
        model_name=args.model_name,
        quality_size=args.quality_size,
        kid_subsets=args.kid_subsets,
        grid_prompts=args.grid_prompts,
        retries=args.retries,
    )
    results = evaluate(opts)
    print(summary_lines(results))


def summary_lines(results: dict) -> str:
    """Mean ± half-width per set, metric and model: the report's table in the terminal."""
    lines = []
    for set_name, per_metric in results["metrics"].items():
        lines.append(f"{set_name} ({len(results['sets'][set_name])} prompts x {len(results['seeds'])} seeds)")
        for key, per_model in per_metric.items():
            cells = "  ".join(
                f"{m} {s['mean']:.4g}" + (f" ± {s['half']:.2g}" if s["half"] is not None else "")
                for m, s in per_model.items()
            )
            lines.append(f"  {key:<20} {cells}")
    gen = results["generation"]
    lines.append(f"images: {gen['generated']} generated, {gen['cached']} reused; report: {results['report']}")
    return "\n".join(lines)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", default="auto", help="model spec (default: from the model directory)")
    p.add_argument(
        "--weights",
        choices=("student", "teacher"),
        default="student",
        help="which weights of a training checkpoint (default: student)",
    )
    p.add_argument("--steps", type=int, help="inference steps (default: the model's few-step setting)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def add_eval_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "precheck",
        help="before training: is the teacher's roll-out closer to the target than the prompt-only student's?",
    )
    p.add_argument("--model", required=True, help="the base model directory (a diffusers pipeline or toy model)")
    p.add_argument("--data", required=True, help="feature shards cached with --latents (directory, glob, pattern)")
    p.add_argument("--manifest", help="the shards' manifest.json (default: in / beside --data)")
    p.add_argument("--out", required=True, help="writes precheck.json and precheck_grid.png here")
    p.add_argument("--encoder", help="local DINOv2 or CLIP directory for a feature distance (default: pixels only)")
    p.add_argument("--checkpoint", help="precheck a training checkpoint's weights instead of the base's")
    p.add_argument("--samples", type=int, default=16, help="samples of the shards, in order (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    _model_flags(p)
    p.set_defaults(fn=cmd_precheck)

    p = sub.add_parser("eval", help="base vs tuned models over seeds: metrics with 95%% intervals and an HTML report")
    p.add_argument("--base", required=True, help="the base model directory")
    p.add_argument(
        "--tuned",
        action="append",
        metavar="[NAME=]PATH",
        help="a tuned model (repeatable): an export, a checkpoint, a run's checkpoints/ or a run directory",
    )
    p.add_argument("--out", required=True, help="images, results.json and report.html (rerun to resume)")
    p.add_argument("--concept-prompts", help="text file, one prompt per line: the new concept or domain")
    p.add_argument("--general-prompts", help="text file, one prompt per line: what the base could already do")
    p.add_argument("--targets", help="folder of the concept's target images (concept fidelity)")
    p.add_argument("--reference", help="folder of reference images of the domain (FD and KID)")
    p.add_argument("--clip", help="local CLIP directory (both towers): CLIP score and CLIP image similarity")
    p.add_argument("--dino", help="local DINOv2 directory: DINO similarity, FD/KID and retention features")
    p.add_argument(
        "--fd-encoder",
        choices=("auto", "dino", "clip", "pixel"),
        default="auto",
        help="features of FD and KID (auto: DINOv2, else CLIP, else pixels)",
    )
    p.add_argument(
        "--placeholder",
        metavar="TOKEN=WORD",
        help="replace TOKEN by WORD in the prompts CLIP scores (e.g. 'sks=dog'; WORD may be empty)",
    )
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    p.add_argument("--height", type=int, help="pixels (default: the model's default size)")
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="generation dtype (auto: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="Ray actors, one GPU each on CUDA (0: in this process; with --ray-address: one per GPU)",
    )
    p.add_argument("--ray-address", help="join this Ray cluster (auto or host:port); every node must see --out")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed (model, set, seed) task")
    p.add_argument("--quality-size", type=int, default=256, help="pixels at which sharpness and colour are measured")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts per set shown in the report's grids")
    _model_flags(p)
    p.set_defaults(fn=cmd_eval)
