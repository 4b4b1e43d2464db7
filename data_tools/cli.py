"""The data tools' `dopsd` subcommands (registered by `dopsd_scale.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_size_list(text: str) -> list[tuple[int, int]]:
    """'1024x1024,832x1216' -> [(1024, 1024), (832, 1216)] as (H, W)."""
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW[,HxW...], got {text!r}") from None


def cmd_make_synthetic_pairs(args: argparse.Namespace) -> None:
    from .synthetic import make_synthetic_pairs

    print(make_synthetic_pairs(args.out, args.count, args.seed))


def cmd_cache_features(args: argparse.Namespace) -> None:
    from .cache_features import CacheOptions, cache_features

    opts = CacheOptions(
        input_dir=args.input, output_dir=args.output, pipeline=args.pipeline, teacher_vlm=args.teacher_vlm,
        buckets=args.buckets, shard_size=args.shard_size, dtype=args.dtype, latents=args.latents,
        device=args.device, batch_size=args.batch_size, vlm_min_pixels=args.vlm_min_pixels,
        vlm_max_pixels=args.vlm_max_pixels,
    )
    if args.val_prompts:
        lines = Path(args.val_prompts).read_text(encoding="utf-8").splitlines()
        opts.val_prompts = [p.strip() for p in lines if p.strip()]
    summary = cache_features(opts)
    print(f"cached {summary['samples_written']} new sample(s) ({summary['total_samples']} in all), "
          f"{summary['shards_resumed']} finished shard(s) kept, {summary['skipped']} skipped "
          f"(see {Path(args.output) / 'report.jsonl'})")


def add_data_subcommands(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--buckets", type=parse_size_list, default=[(1024, 1024)], help="HxW,HxW,... in pixels")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--latents", action="store_true", help="also cache VAE latents of the target image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vlm-min-pixels", type=int, default=512 * 512)
    p.add_argument("--vlm-max-pixels", type=int, default=768 * 768)
    p.add_argument("--val-prompts", help="text file, one validation prompt per line")
    p.set_defaults(fn=cmd_cache_features)
