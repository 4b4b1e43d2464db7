"""`dopsd bench-data`: the reader's throughput against a raw read of the same tar bytes, and the
caching tool's throughput with the tiny debug encoders at two batch sizes. Prints a table.

Reader: the shards are read once raw first (so both measurements come from the page cache and
the ratio is the reader's own CPU cost: tar parsing, header checks, shuffle, tensor decoding,
padding), then one epoch goes through `build_loader`. A note under the table compares the reader
with the same bytes read once into new batch-sized tensors, and names the machine and its load.
Without `--features` the benchmark writes synthetic feature shards of realistic shape (Z-Image
widths: D = 2560, student 64-256 tokens, teacher 256-768 tokens, bf16). Caching: debug models ->
synthetic pairs -> make-shards -> cache-features in this process, timing only the encoding (not
model loading).
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import webdataset as wds

from dopsd_scale.data.format import FeatureSample, Manifest, encode_sample
from dopsd_scale.data.reader import build_loader
from dopsd_scale.data.shards import resolve_shards


def write_synthetic_features(out: Path, samples: int, dim: int, shard_size: int = 32, seed: int = 0) -> Path:
    """Random feature shards with realistic lengths; two buckets."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    manifest = Manifest(producer={"kind": "features", "feature_dim": dim, "synthetic": True})
    for s, start in enumerate(range(0, samples, shard_size)):
        name = f"features-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(start, min(samples, start + shard_size)):
                tensors = {
                    "student": torch.randn(rng.randint(64, 256), dim),
                    "teacher": torch.randn(rng.randint(256, 768), dim),
                }
                bucket = [1024, 1024] if i % 2 else [832, 1216]
                sink.write(encode_sample(FeatureSample(f"{i:09d}", {"caption": "x", "bucket": bucket}, tensors)))
        manifest.shards[name] = min(samples, start + shard_size) - start
    manifest.save(out)
    return out


def bench_reader(spec: str, batch_size: int = 4, num_workers: int = 0, manifest: Optional[str] = None) -> dict:
    shards = resolve_shards(spec, manifest)
    samples = shards.manifest.num_samples
    nbytes = sum(Path(u).stat().st_size for u in shards.urls)

    def raw_read() -> float:
        t0 = time.perf_counter()
        for url in shards.urls:
            with open(url, "rb") as f:
                while f.read(1 << 22):
                    pass
        return time.perf_counter() - t0

    def one_copy() -> float:
        """The same bytes read into new batch-sized tensors: what any reader that keeps them pays."""
        t0 = time.perf_counter()
        chunk = max(1 << 20, nbytes // samples * batch_size)
        for url in shards.urls:
            with open(url, "rb", buffering=0) as f:
                while f.readinto(torch.empty(chunk, dtype=torch.uint8).numpy()):
                    pass
        return time.perf_counter() - t0

    raw_read()  # warm the page cache
    raw = raw_read()
    copy = min(one_copy(), one_copy())
    loader = build_loader(
        spec,
        batch_size,
        int(shards.manifest.feature_dim),
        num_workers=num_workers,
        shuffle_buffer=16,
        manifest=manifest,
    )
    batches = max(1, samples // batch_size - 2 * len(shards.urls))  # within one epoch despite remainders
    next(loader)  # start-up (worker processes) is not throughput
    t0 = time.perf_counter()
    seen = sum(len(next(loader)) for _ in range(batches - 1))
    reader = time.perf_counter() - t0
    mb_per_sample = nbytes / 1e6 / samples
    return {
        "samples": seen,
        "raw_samples_per_s": samples / raw,
        "raw_mb_per_s": nbytes / 1e6 / raw,
        "reader_samples_per_s": seen / reader,
        "reader_mb_per_s": seen * mb_per_sample / reader,
        "ratio": (seen / reader) / (samples / raw),
        "one_copy_samples_per_s": samples / copy,
    }


def bench_cache(work: Path, count: int = 32, batch_sizes: tuple[int, ...] = (1, 8)) -> dict[int, dict]:
    from dopsd_scale.models.debug_assets import make_debug_models

    from .cache_features import CacheOptions, cache_features
    from .make_shards import ShardOptions, make_shards
    from .synthetic import make_synthetic_pairs

    models = make_debug_models(work / "models")
    pairs = make_synthetic_pairs(work / "pairs", count=count)
    buckets = [(32, 32), (32, 48), (48, 32)]
    make_shards(
        ShardOptions(str(pairs), str(work / "images"), shard_size=16, buckets=buckets, min_side=16, processes=1)
    )
    results = {}
    for bs in batch_sizes:
        summary = cache_features(
            CacheOptions(
                input_dir=str(work / "images"),
                output_dir=str(work / f"features_bs{bs}"),
                pipeline=str(models["pipeline"]),
                teacher_vlm=str(models["teacher_vlm"]),
                batch_size=bs,
                latents=True,
                vlm_min_pixels=32 * 32,
                vlm_max_pixels=64 * 64,
            )
        )
        results[bs] = {"samples": summary["samples_written"], "samples_per_s": summary["encode_samples_per_s"]}
    return results


def run_benchmarks(
    features: Optional[str] = None,
    manifest: Optional[str] = None,
    batch_size: int = 4,
    num_workers: int = 0,
    synthetic_samples: int = 128,
    dim: int = 2560,
    cache_count: int = 32,
    cache: bool = True,
) -> str:
    """Run both benchmarks and return the table."""
    lines = ["| benchmark | samples | samples/s | MB/s | ratio |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="dopsd-bench-") as tmp:
        work = Path(tmp)
        spec = features or str(write_synthetic_features(work / "synthetic", synthetic_samples, dim))
        r = bench_reader(spec, batch_size, num_workers, manifest)
        lines.append(
            f"| raw read of the tar bytes | {synthetic_samples if not features else '-'} | "
            f"{r['raw_samples_per_s']:.0f} | {r['raw_mb_per_s']:.0f} | 1.00 |"
        )
        lines.append(
            f"| reader (batch {batch_size}, {num_workers} workers) | {r['samples']} | "
            f"{r['reader_samples_per_s']:.0f} | {r['reader_mb_per_s']:.0f} | {r['ratio']:.2f} |"
        )
        notes = [
            f"reader / a one-copy read into new batch-sized memory ({r['one_copy_samples_per_s']:.0f} samples/s):"
            f" {r['reader_samples_per_s'] / r['one_copy_samples_per_s']:.2f} (the reader adds the padding's "
            "zeros, tar and header parsing, a read per tensor, page faults on new batch memory)",
            _machine(),
        ]
        if cache:
            for bs, c in bench_cache(work / "cache", cache_count).items():
                lines.append(
                    f"| cache-features, debug encoders, batch {bs} | {c['samples']} | "
                    f"{c['samples_per_s']:.1f} | - | - |"
                )
    return "\n".join(lines + [""] + notes)


def _machine() -> str:
    """What the numbers depend on: the CPU, its cores and how busy they were."""
    import os
    import platform

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, load average {load}; "
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
