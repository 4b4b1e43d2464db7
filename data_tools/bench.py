"""`dopsd bench-data`: the reader's throughput against a raw read of the same tar bytes, and the
caching tool's throughput with the tiny debug encoders at two batch sizes. Prints a table.

Reader, measured twice, each against a raw read under the same condition:
- from disk: every shard's pages are dropped from the page cache (fsync, then
  `posix_fadvise(DONTNEED)`) before each read; what a training run meets on a shard's first
  epoch, and what "the speed of the disk" means;
- from the page cache: the same read with every byte cached, so the ratio is the reader's own
  CPU cost (tar walk, header checks, shuffle, one copy per tensor into its padded batch row, the
  padding's zeros) against copying the bytes into one reused 4 MiB buffer, which stays in cache.
Each figure is the median of `repeats` runs taken in turn (raw, reader, raw, reader, ...);
the spread is printed. The reader's first batch (start-up, worker processes) is not timed; the
read-ahead of the first two shards begins in it, which flatters a from-disk figure over few
shards (128 samples in 4 shards: 1.44x the raw read; 512 in 16: 0.96x), hence 512 by default.
Without `--features` the benchmark writes synthetic feature shards of realistic shape (Z-Image
widths: D = 2560, student 64-256 tokens, teacher 256-768 tokens, bf16). Caching: debug models ->
synthetic pairs -> make-shards -> cache-features in this process, timing only the encoding (not
model loading).
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import webdataset as wds

from dopsd_scale.data.format import FeatureSample, Manifest, encode_sample
from dopsd_scale.data.reader import build_loader
from dopsd_scale.data.shards import READ_AHEAD_THREAD, is_local, read_through, resolve_shards


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


def drop_page_cache(paths: list[str]) -> bool:
    """Evict the files' pages from the page cache (Linux; dirty pages are written first). False
    where the platform has no such call (then "from disk" cannot be measured)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _raw_read(urls: list[str]) -> float:
    """Seconds to read every byte into one reused buffer (no allocation in the loop)."""
    t0 = time.perf_counter()
    for url in urls:
        read_through(url)
    return time.perf_counter() - t0


def _reader_read(spec: str, batch_size: int, num_workers: int, manifest: Optional[str], feature_dim: int, batches: int):
    """(samples, seconds) of `batches` batches through `build_loader`, after its first batch."""
    loader = build_loader(spec, batch_size, feature_dim, num_workers=num_workers, shuffle_buffer=16, manifest=manifest)
    next(loader)  # start-up (worker processes) is not throughput
    t0 = time.perf_counter()
    seen = sum(len(next(loader)) for _ in range(batches))
    seconds = time.perf_counter() - t0
    for thread in threading.enumerate():  # shards read ahead must not overlap the next measurement
        if thread.name == READ_AHEAD_THREAD:
            thread.join()
    return seen, seconds


def bench_reader(
    spec: str, batch_size: int = 4, num_workers: int = 0, manifest: Optional[str] = None, repeats: int = 3
) -> dict[str, dict]:
    """{"disk" | "cache": {raw_samples_per_s, reader_samples_per_s, ratio, ...}} (medians)."""
    shards = resolve_shards(spec, manifest)
    urls = shards.urls
    streamed = [u for u in urls if not is_local(u)]
    if streamed:  # a raw read needs the files themselves
        raise ValueError(f"{streamed[0]}: bench-data compares against a raw read of local shard files")
    samples = shards.manifest.num_samples
    mb_per_sample = sum(Path(u).stat().st_size for u in urls) / 1e6 / samples
    batches = max(1, samples // batch_size - 2 * len(urls)) - 1  # within one epoch despite remainders
    conditions = {"cache": lambda: None}
    if drop_page_cache(urls):
        conditions = {"disk": lambda: drop_page_cache(urls), **conditions}
    results = {}
    for name, prepare in conditions.items():
        raw, reader, seen = [], [], 0
        _raw_read(urls)  # everything cached at first, whatever the previous condition left
        for _ in range(repeats):
            prepare()
            raw.append(samples / _raw_read(urls))
            prepare()
            seen, seconds = _reader_read(spec, batch_size, num_workers, manifest, shards.manifest.feature_dim, batches)
            reader.append(seen / seconds)
        raw_s, reader_s = statistics.median(raw), statistics.median(reader)
        results[name] = {
            "samples": seen,
            "raw_samples_per_s": raw_s,
            "raw_spread": (min(raw), max(raw)),
            "reader_samples_per_s": reader_s,
            "reader_spread": (min(reader), max(reader)),
            "mb_per_sample": mb_per_sample,
            "ratio": reader_s / raw_s,
        }
    return results


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
    synthetic_samples: int = 512,
    dim: int = 2560,
    cache_count: int = 32,
    cache: bool = True,
    repeats: int = 3,
) -> str:
    """Run both benchmarks and return the table."""
    lines = [
        f"| benchmark | samples | samples/s (median of {repeats}, min-max) | MB/s | reader / raw |",
        "|---|---|---|---|---|",
    ]
    where = {"disk": "from disk", "cache": "from the page cache"}
    with tempfile.TemporaryDirectory(prefix="dopsd-bench-") as tmp:
        work = Path(tmp)
        spec = features or str(write_synthetic_features(work / "synthetic", synthetic_samples, dim))
        reader = f"reader (batch {batch_size}, {num_workers} workers)"
        for name, r in bench_reader(spec, batch_size, num_workers, manifest, repeats).items():
            total = synthetic_samples if not features else "-"
            lines.append(_row(f"raw read of the tar bytes, {where[name]}", total, r, "raw", "1.00"))
            lines.append(_row(f"{reader}, {where[name]}", r["samples"], r, "reader", f"{r['ratio']:.2f}"))
        if cache:
            for bs, c in bench_cache(work / "cache", cache_count).items():
                lines.append(
                    f"| cache-features, debug encoders, batch {bs} | {c['samples']} | "
                    f"{c['samples_per_s']:.1f} | - | - |"
                )
    return "\n".join(lines + ["", _machine()])


def _row(name: str, samples, result: dict, which: str, ratio: str) -> str:
    rate, (low, high) = result[f"{which}_samples_per_s"], result[f"{which}_spread"]
    return (
        f"| {name} | {samples} | {rate:.0f} ({low:.0f}-{high:.0f}) | {rate * result['mb_per_sample']:.0f} | {ratio} |"
    )


def _machine() -> str:
    """What the numbers depend on: the CPU, its cores and how busy they were."""
    import platform

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, load average {load}; "
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
