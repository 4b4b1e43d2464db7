"""The data tools' `dopsd` subcommands (registered by `dopsd_scale.cli`).

make-shards -> cache-features -> (train); inspect and verify at any point; bench-data for the
reader's and the caching tool's throughput. Each tool prints a one-line summary with its
counts; a tool that had to skip or fail something says where the report is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_size_list(text: str) -> list[tuple[int, int]]:
    """'1024x1024,832x1216' -> [(1024, 1024), (832, 1216)] as (H, W)."""
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW[,HxW...], got {text!r}") from None


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_make_synthetic_pairs(args: argparse.Namespace) -> None:
    from .synthetic import make_synthetic_pairs

    print(make_synthetic_pairs(args.out, args.count, args.seed))


def cmd_make_shards(args: argparse.Namespace) -> None:
    from .common import format_counts
    from .images import make_buckets, parse_ratios
    from .make_shards import ShardOptions, make_shards

    buckets = args.buckets or make_buckets(args.bucket_area**2, parse_ratios(args.bucket_ratios), args.bucket_multiple)
    opts = ShardOptions(
        input=args.input,
        output_dir=args.output,
        shard_size=args.shard_size,
        shard_bytes=int(args.shard_mb * 2**20),
        buckets=buckets,
        min_side=args.min_side,
        max_aspect=args.max_aspect,
        processes=args.processes,
        caption_columns=args.caption_columns,
        image_column=args.image_column,
        split=args.split,
        reference_columns=args.reference_columns,
    )
    s = make_shards(opts)
    print(
        f"make-shards: {s['samples']} sample(s) in {s['shards']} shard(s) from {s['inputs']} input(s) "
        f"({s['layout']}), {s['shards_resumed']} finished shard(s) kept, {s['seconds']} s; "
        f"report: {format_counts(s['reasons'])} (see {Path(args.output) / 'report.jsonl'})"
    )
    print("buckets: " + ", ".join(f"{k}: {v}" for k, v in s["buckets"].items()))


def cmd_cache_features(args: argparse.Namespace) -> None:
    from .cache_features import CacheOptions, cache_features
    from .common import format_counts

    opts = CacheOptions(
        input_dir=args.input,
        output_dir=args.output,
        pipeline=args.pipeline,
        teacher_vlm=args.teacher_vlm,
        model_name=args.model_name,
        teacher_context=args.teacher_context,
        teacher_caption_field=args.teacher_caption_field,
        instruction=args.instruction,
        extra_references=args.extra_references,
        vlm_positions=args.vlm_positions,
        prompts_only=args.prompts_only,
        caption_columns=args.caption_columns,
        buckets=args.buckets or [],
        shard_size=args.shard_size,
        dtype=args.dtype,
        latents=args.latents,
        device=args.device,
        batch_size=args.batch_size,
        vlm_min_pixels=args.vlm_min_pixels,
        vlm_max_pixels=args.vlm_max_pixels,
        input_manifest=args.input_manifest,
        actors=args.actors,
        ray_address=args.ray_address,
        retries=args.retries,
        threads=args.threads,
    )
    if args.val_prompts:
        lines = Path(args.val_prompts).read_text(encoding="utf-8").splitlines()
        opts.val_prompts = [p.strip() for p in lines if p.strip()]
    s = cache_features(opts)
    print(
        f"cache-features: {s['samples_written']} new sample(s) ({s['total_samples']} in all, "
        f"{s['samples_per_s']} samples/s), {s['shards_resumed']} finished shard(s) kept, "
        f"{len(s['shards_failed'])} failed; report: {format_counts(s['reasons'])} "
        f"(see {Path(args.output) / 'report.jsonl'})"
    )
    if s["shards_failed"]:
        sys.exit(f"cache-features: shard(s) failed after retries: {', '.join(s['shards_failed'])}; rerun to retry them")


def cmd_inspect(args: argparse.Namespace) -> None:
    from .inspect_shards import inspect_shards

    info = inspect_shards(args.shards, args.manifest, args.limit)
    if args.json:
        print(json.dumps(info, indent=1))
        return
    print(
        f"{info['kind']}: {info['samples']} good sample(s) in {info['scanned']} of {info['shards']} shard(s) "
        f"(manifest: {info['manifest_samples']}), {info['bad']} bad, {info['mbytes']} MB"
    )
    print("buckets: " + ", ".join(f"{k}: {v}" for k, v in info["buckets"].items()))
    print("caption variants per sample: " + ", ".join(f"{k}: {v}" for k, v in info["caption_variants"].items()))
    for name, st in info["lengths"].items():
        print(f"{name} length: " + ", ".join(f"{k} {v}" for k, v in st.items()))


def cmd_verify(args: argparse.Namespace) -> None:
    from .inspect_shards import verify_shards

    problems = verify_shards(args.features, args.images, args.manifest, args.images_manifest)
    for p in problems:
        print(p)
    if problems:
        sys.exit(f"verify: {len(problems)} problem(s)")
    print("verify: ok")


def cmd_bench_data(args: argparse.Namespace) -> None:
    from .bench import run_benchmarks

    print(
        run_benchmarks(
            args.features,
            args.manifest,
            args.batch_size,
            args.num_workers,
            args.synthetic_samples,
            args.dim,
            args.cache_count,
            cache=not args.no_cache,
            repeats=args.repeats,
        )
    )


def _add_make_shards(sub) -> None:
    p = sub.add_parser("make-shards", help="raw image-text pairs -> WebDataset image shards")
    p.add_argument(
        "--input",
        required=True,
        help="folder of pairs, .jsonl/.csv/.parquet manifest, imagefolder, or save_to_disk dataset",
    )
    p.add_argument("--output", required=True)
    p.add_argument("--shard-size", type=int, default=1000, help="inputs per shard at most")
    p.add_argument("--shard-mb", type=float, default=1024, help="image MiB per shard at most")
    p.add_argument("--buckets", type=parse_size_list, help="explicit HxW,HxW,... (else built from the next three)")
    p.add_argument("--bucket-area", type=int, default=1024, help="buckets of about N*N pixels")
    p.add_argument("--bucket-ratios", help="W:H list (default: 11 ratios from 1:2 to 2:1)")
    p.add_argument("--bucket-multiple", type=int, default=32, help="bucket sides are multiples of this")
    p.add_argument("--min-side", type=int, default=256, help="skip images whose shorter side is smaller")
    p.add_argument("--max-aspect", type=float, default=4.0, help="skip images more elongated (0: keep all)")
    p.add_argument("--processes", type=int, default=0, help="writer processes (0: one per core)")
    p.add_argument("--caption-columns", type=parse_list, help="manifest/dataset caption columns, in variant order")
    p.add_argument("--image-column", help="manifest image-path column (default: image, file_name, path...)")
    p.add_argument(
        "--reference-columns",
        type=parse_list,
        help="manifest columns naming extra reference images per sample (multi-reference contexts)",
    )
    p.add_argument("--split", default="train", help="split of a saved DatasetDict")
    p.set_defaults(fn=cmd_make_shards)


def _add_cache_features(sub) -> None:
    p = sub.add_parser("cache-features", help="image shards (or a folder of pairs) -> feature shards")
    p.add_argument(
        "--input", required=True, help="image shards: directory, glob, brace or pipe: spec; or a folder of pairs"
    )
    p.add_argument("--input-manifest", help="the image shards' manifest.json (needed for pipe: specs)")
    p.add_argument("--output", required=True)
    p.add_argument("--pipeline", required=True, help="model directory: diffusers pipeline (text encoder, vae) or toy")
    p.add_argument("--model-name", default="auto", help="model spec (default: from the pipeline directory)")
    p.add_argument(
        "--teacher-context",
        default="auto",
        help="vlm, edit_reference, enhanced_prompt, prompt, silhouette_reference or module:Class "
        "(default: the model family's recipe)",
    )
    p.add_argument("--teacher-vlm", help="vlm context: Qwen3-VL directory (its language model gets the text encoder)")
    p.add_argument(
        "--vlm-positions",
        choices=("vlm", "text"),
        default="vlm",
        help="vlm context: the VLM's own rotary positions (reference code) or the text encoder's",
    )
    p.add_argument("--teacher-caption-field", help="enhanced_prompt context: the caption column the teacher reads")
    p.add_argument("--instruction", help="edit_reference context: editing instruction (default: the reference code's)")
    p.add_argument(
        "--extra-references",
        action="store_true",
        help="edit_reference context: add the sample's extra reference images (ref_<i> members)",
    )
    p.add_argument("--buckets", type=parse_size_list, help="HxW,... (default: the image shards' buckets)")
    p.add_argument(
        "--prompts-only",
        action="store_true",
        help="an anchor set: prompt-only samples from a .txt/.jsonl/.csv/.parquet file or any image "
        "input's captions (teacher context: the prompt itself; buckets cycle through --buckets)",
    )
    p.add_argument("--caption-columns", type=parse_list, help="--prompts-only from a table: its caption columns")
    p.add_argument("--shard-size", type=int, default=256, help="pairs (or prompts) per shard (folder/prompt input)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--latents", action="store_true", help="also cache VAE latents of the target image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--actors", type=int, default=0, help="Ray actors, one GPU each on cuda (0: in this process)")
    p.add_argument("--ray-address", help="Ray cluster to join (auto, host:port); default: a private local one")
    p.add_argument("--retries", type=int, default=2, help="extra tries of a failing shard")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: default)")
    p.add_argument("--vlm-min-pixels", type=int, default=512 * 512)
    p.add_argument("--vlm-max-pixels", type=int, default=768 * 768)
    p.add_argument("--val-prompts", help="text file, one validation prompt per line")
    p.set_defaults(fn=cmd_cache_features)


def add_data_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-synthetic-pairs", help="write synthetic image-text pairs")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_synthetic_pairs)
    _add_make_shards(sub)
    _add_cache_features(sub)

    p = sub.add_parser("inspect", help="counts, buckets, caption variants and feature lengths of shards")
    p.add_argument("shards", help="directory, glob, brace or pipe: spec (image or feature shards)")
    p.add_argument("--manifest", help="manifest.json (needed for pipe: specs)")
    p.add_argument("--limit", type=int, help="scan only the first N shards")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("verify", help="check feature shards against their manifest (and their image shards)")
    p.add_argument("features", help="feature shards: directory, glob, brace or pipe: spec")
    p.add_argument("--images", help="the image shards they came from: keys must line up")
    p.add_argument("--manifest", help="the features' manifest.json (pipe: specs)")
    p.add_argument("--images-manifest", help="the image shards' manifest.json (pipe: specs)")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("bench-data", help="reader vs raw tar read, and caching throughput")
    p.add_argument("--features", help="feature shards to read (default: synthetic ones of realistic shape)")
    p.add_argument("--manifest")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--synthetic-samples", type=int, default=512, help="synthetic samples, 32 per shard (default: 512)")
    p.add_argument("--dim", type=int, default=2560)
    p.add_argument("--cache-count", type=int, default=32, help="pairs cached per batch size")
    p.add_argument("--no-cache", action="store_true", help="skip the caching benchmark")
    p.add_argument("--repeats", type=int, default=3, help="runs per reader measurement (the median is shown)")
    p.set_defaults(fn=cmd_bench_data)
