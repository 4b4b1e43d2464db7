"""The `dopsd` command: train, sample, export, and the offline data tools."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dopsd_data_tools.cli import add_data_subcommands
from dopsd_data_tools.common import InputError, ManifestMismatch

from .config import ConfigError
from .contexts import ContextError
from .evaluation.cli import add_eval_subcommands
from .toyworld.cli import add_toyworld_subcommands

log = logging.getLogger("dopsd")


# ---- subcommands ----------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .distributed import shutdown_distributed
    from .trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    try:
        with Trainer(cfg) as trainer:
            trainer.fit()
    except BaseException:
        shutdown_distributed(clean=False)
        raise
    shutdown_distributed()


def cmd_make_debug_models(args: argparse.Namespace) -> None:
    from .models.debug_assets import make_debug_models

    dirs = make_debug_models(args.out, seed=args.seed)
    for name, path in dirs.items():
        print(f"{name}: {path}")


def cmd_sample(args: argparse.Namespace) -> None:
    from .sample import sample_images

    paths = sample_images(
        args.model,
        args.prompt,
        args.out,
        checkpoint=args.checkpoint,
        steps=args.steps,
        height=args.height,
        width=args.width,
        seed=args.seed,
        model_name=args.model_name,
        weights=args.weights,
        lora=args.lora,
    )
    for p in paths:
        print(p)


def cmd_export(args: argparse.Namespace) -> None:
    from .sample import export_checkpoint

    print(
        export_checkpoint(
            args.model, args.checkpoint, args.out, which=args.weights, model_name=args.model_name, merged=args.merged
        )
    )


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dopsd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with D-OPSD (or the SFT baseline)")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("make-debug-models", help="write the tiny Z-Image pipeline and teacher VLM")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_debug_models)

    add_data_subcommands(sub)
    add_toyworld_subcommands(sub)
    add_eval_subcommands(sub)

    p = sub.add_parser("sample", help="few-step images with the stock diffusers pipeline")
    p.add_argument("--model", required=True, help="pipeline directory (e.g. an export)")
    p.add_argument("--checkpoint", help="load the student weights of this checkpoint first")
    p.add_argument("--model-name", default="auto", help="model spec (default: from the model directory)")
    p.add_argument(
        "--weights",
        choices=("student", "teacher"),
        default="student",
        help="with --checkpoint: the student or the EMA teacher",
    )
    p.add_argument(
        "--lora",
        help="an exported LoRA adapter (directory with pytorch_lora_weights.safetensors, or a "
        "LoRA run's export/) to load into --model with the stock LoRA loader",
    )
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, help="inference steps (default: the model's few-step setting)")
    p.add_argument("--height", type=int, help="pixels (default: the model's default size)")
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("export", help="checkpoint -> diffusers-format model directory")
    p.add_argument("--model", required=True, help="the base model directory the run started from")
    p.add_argument("--checkpoint", required=True, help="a checkpoint (or a run's checkpoints/ folder)")
    p.add_argument("--model-name", default="auto", help="model spec (default: from the model directory)")
    p.add_argument("--weights", choices=("student", "teacher"), default="student")
    p.add_argument(
        "--merged",
        action="store_true",
        help="LoRA checkpoints: also write <out>/merged, the model with the adapter merged in",
    )
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("DOPSD_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, ContextError, InputError, ManifestMismatch, FileNotFoundError) as err:
        print(f"dopsd {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
