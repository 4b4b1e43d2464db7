"""Fixtures of the data-tool tests: synthetic pairs with caption variants, and their image shards."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from dopsd_data_tools.make_shards import ShardOptions, make_shards
from dopsd_data_tools.synthetic import make_synthetic_pairs
from PIL import Image

from ..conftest import DEBUG_BUCKETS


def pairs_with_variants(root: Path, count: int = 12, seed: int = 0) -> Path:
    """Synthetic pairs; every third one also has a `<stem>.tags.txt` caption variant."""
    pairs = make_synthetic_pairs(root, count=count, seed=seed)
    for i in range(0, count, 3):
        (pairs / f"{i:06d}.tags.txt").write_text(f"tags, shape, number {i}\n", encoding="utf-8")
    return pairs


def shard_options(src: Path, out: Path, **kw) -> ShardOptions:
    base = dict(shard_size=3, buckets=list(DEBUG_BUCKETS), min_side=16, processes=1)
    return ShardOptions(str(src), str(out), **{**base, **kw})


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory) -> Path:
    """12 pairs (4 with two caption variants) in 4 image shards."""
    root = tmp_path_factory.mktemp("images")
    make_shards(shard_options(pairs_with_variants(root / "pairs"), root / "shards"))
    return root / "shards"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()
