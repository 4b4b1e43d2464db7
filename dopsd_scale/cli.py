"""The `dopsd` command: train, sample, export, and the offline data tools."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError

log = logging.getLogger("dopsd")


def _parse_size_list(text: str) -> list[tuple[int, int]]:
    """'1024x1024,832x1216' -> [(1024, 1024), (832, 1216)] as (H, W)."""
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW[,HxW...], got {text!r}") from None


# ---- subcommands ----------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    Trainer(cfg).fit()


def cmd_make_debug_models(args: argparse.Namespace) -> None:
    from .models.debug_assets import make_debug_models

    dirs = make_debug_models(args.out, seed=args.seed)
    for name, path in dirs.items():
        print(f"{name}: {path}")


def cmd_make_synthetic_pairs(args: argparse.Namespace) -> None:
    from dopsd_data_tools.synthetic import make_synthetic_pairs

    print(make_synthetic_pairs(args.out, args.count, args.seed))


def cmd_cache_features(args: argparse.Namespace) -> None:
    from dopsd_data_tools.cache_features import CacheOptions, cache_features

    opts = CacheOptions(
        input_dir=args.input, output_dir=args.output, pipeline=args.pipeline, teacher_vlm=args.teacher_vlm,
        buckets=args.buckets, shard_size=args.shard_size, dtype=args.dtype, latents=args.latents,
        device=args.device, batch_size=args.batch_size, vlm_min_pixels=args.vlm_min_pixels,
        vlm_max_pixels=args.vlm_max_pixels,
    )
    if args.val_prompts:
        opts.val_prompts = [p.strip() for p in Path(args.val_prompts).read_text(encoding="utf-8").splitlines() if p.strip()]
    summary = cache_features(opts)
    print(f"cached {summary['samples_written']} new sample(s) ({summary['total_samples']} in all), "
          f"{summary['shards_resumed']} finished shard(s) kept, {summary['skipped']} skipped "
          f"(see {Path(args.output) / 'report.jsonl'})")


def cmd_sample(args: argparse.Namespace) -> None:
    from .sample import sample_images

    paths = sample_images(args.model, args.prompt, args.out, checkpoint=args.checkpoint, steps=args.steps,
                          height=args.height, width=args.width, seed=args.seed, model_name=args.model_name)
    for p in paths:
        print(p)


def cmd_export(args: argparse.Namespace) -> None:
    from .sample import export_checkpoint

    print(export_checkpoint(args.model, args.checkpoint, args.out, which=args.weights, model_name=args.model_name))


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

    p = sub.add_parser("make-synthetic-pairs", help="write synthetic image-text pairs")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_synthetic_pairs)

    p = sub.add_parser("cache-features", help="image-text pairs -> feature shards")
    p.add_argument("--input", required=True, help="folder of <key>.<png|jpg|webp> + <key>.txt")
    p.add_argument("--output", required=True)
    p.add_argument("--pipeline", required=True, help="diffusers pipeline directory (text encoder, vae)")
    p.add_argument("--teacher-vlm", required=True, help="Qwen3-VL directory for the teacher context")
    p.add_argument("--buckets", type=_parse_size_list, default=[(1024, 1024)], help="HxW,HxW,... in pixels")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--latents", action="store_true", help="also cache VAE latents of the target image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vlm-min-pixels", type=int, default=512 * 512)
    p.add_argument("--vlm-max-pixels", type=int, default=768 * 768)
    p.add_argument("--val-prompts", help="text file, one validation prompt per line")
    p.set_defaults(fn=cmd_cache_features)

    p = sub.add_parser("sample", help="few-step images with the stock diffusers pipeline")
    p.add_argument("--model", required=True, help="pipeline directory (e.g. an export)")
    p.add_argument("--checkpoint", help="load the student weights of this checkpoint first")
    p.add_argument("--model-name", default="zimage")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("export", help="checkpoint -> diffusers-format model directory")
    p.add_argument("--model", required=True, help="the base model directory the run started from")
    p.add_argument("--checkpoint", required=True, help="a checkpoint (or a run's checkpoints/ folder)")
    p.add_argument("--model-name", default="zimage")
    p.add_argument("--weights", choices=("student", "teacher"), default="student")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DOPSD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"dopsd {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
