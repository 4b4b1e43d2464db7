"""Shared fixtures: the tiny models and feature shards are built once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Passive OpenMP waiting (read when torch loads): a test and the torchrun ranks or pipelines it
# starts would otherwise spin against each other on 2 cores and run 10-20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in the interpreter, which must be chosen before triton
# is first imported (some tests build models with the triton attention backend).
import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dopsd_data_tools.cache_features import CacheOptions, cache_features
from dopsd_data_tools.synthetic import make_synthetic_pairs

from dopsd_scale.config import load_config
from dopsd_scale.models.debug_assets import make_debug_models

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = REPO / "launch" / "configs" / "debug_zimage.yaml"
DEBUG_BUCKETS = [(32, 32), (32, 48), (48, 32)]


def run_dopsd(*args: str, env: dict | None = None, timeout: int = 300, check: bool = True):
    """`python -m dopsd_scale.cli ARGS` from the repo root (output captured as text); with `check`,
    a non-zero exit fails the test with the command's stderr."""
    cmd = [sys.executable, "-m", "dopsd_scale.cli", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"dopsd {args[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray cluster for one test module: 2 CPUs, a small object store, loopback."""
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=96 << 20,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def debug_models(tmp_path_factory) -> dict[str, Path]:
    return make_debug_models(tmp_path_factory.mktemp("assets"))


def debug_cache_options(pairs: Path, out: Path, models: dict[str, Path], **kw) -> CacheOptions:
    return CacheOptions(
        input_dir=str(pairs),
        output_dir=str(out),
        pipeline=str(models["pipeline"]),
        teacher_vlm=str(models["teacher_vlm"]),
        buckets=list(DEBUG_BUCKETS),
        shard_size=4,
        latents=True,
        vlm_min_pixels=32 * 32,
        vlm_max_pixels=64 * 64,
        **kw,
    )


@pytest.fixture(scope="session")
def features(tmp_path_factory, debug_models) -> Path:
    """16 synthetic pairs cached into 4 feature shards (with latents and validation prompts)."""
    root = tmp_path_factory.mktemp("data")
    pairs = make_synthetic_pairs(root / "pairs", count=16, seed=0)
    out = root / "features"
    cache_features(debug_cache_options(pairs, out, debug_models))
    return out


ANCHOR_PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
    "a purple circle on an orange background",
    "a blue square on a yellow background",
    "an orange triangle on a green background",
    "a white circle on a red background",
    "a black square on a purple background",
]


def cache_anchor_set(root: Path, models: dict[str, Path], prompts: list[str], shard_size: int = 2) -> Path:
    """Prompt-only samples (an anchor set) of the debug pipeline: `cache-features --prompts-only`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "anchors.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = root / "anchors"
    cache_features(
        CacheOptions(
            input_dir=str(root / "anchors.txt"),
            output_dir=str(out),
            pipeline=str(models["pipeline"]),
            prompts_only=True,
            buckets=[(32, 32)],
            shard_size=shard_size,
        )
    )
    return out


@pytest.fixture(scope="session")
def anchor_features(tmp_path_factory, debug_models) -> Path:
    """8 anchor prompts in 4 shards (prompt-only samples, `prompt` context)."""
    return cache_anchor_set(tmp_path_factory.mktemp("anchors"), debug_models, ANCHOR_PROMPTS)


@pytest.fixture
def make_config(tmp_path, debug_models, features):
    """The debug config pointed at the session's models and shards, plus overrides."""

    def make(*overrides: str):
        base = [
            f"model.path={debug_models['pipeline']}",
            f"data.path={features}",
            f"run.output_dir={tmp_path / 'run'}",
            "metrics.tensorboard=false",
        ]
        return load_config(str(DEBUG_CONFIG), base + list(overrides))

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_feature_shards(
    out: Path,
    num_shards: int = 8,
    per_shard: int = 5,
    dim: int = 8,
    variants: int = 1,
    buckets=((32, 32), (32, 48)),
    seed: int = 0,
) -> Path:
    """Small random feature shards + manifest, no encoders (for reader tests): sample i of the
    whole set has key f"{i:06d}", bucket buckets[i % len(buckets)], student length 1 + i % 5."""
    import webdataset as wds

    from dopsd_scale.data.format import FeatureSample, Manifest, encode_sample, variant_name

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    manifest = Manifest(producer={"kind": "features", "feature_dim": dim, "synthetic": True})
    for s in range(num_shards):
        name = f"features-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for j in range(per_shard):
                i = s * per_shard + j
                tensors = {}
                for v in range(variants):
                    tensors[variant_name("student", v)] = torch.full((1 + i % 5, dim), float(v)) + torch.randn(
                        1 + i % 5, dim, generator=gen
                    )
                    tensors[variant_name("teacher", v)] = torch.full((2 + i % 3, dim), float(v))
                meta = {
                    "caption": f"c{i}",
                    "captions": [f"c{i}/{v}" for v in range(variants)],
                    "bucket": list(buckets[i % len(buckets)]),
                }
                sink.write(encode_sample(FeatureSample(f"{i:06d}", meta, tensors), torch.float32))
        manifest.shards[name] = per_shard
    manifest.save(out)
    return out
