"""The toy world: deterministic renders, caption grammar, reference masks, the shipped evaluator, metrics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dopsd_scale.toyworld import metrics, world
from dopsd_scale.toyworld.classifier import SHAPE_CLASSES, classify, gaussian_blur, load_classifier

TEST_SEED = 777  # the classifier trained on seed 0 and was evaluated on 20_000


@pytest.fixture(scope="module")
def evaluator():
    return load_classifier()


def _items_per_class(per_class: int, seed: int) -> list[world.Item]:
    rng = np.random.default_rng(seed)
    items = []
    for cls in SHAPE_CLASSES:
        for k in range(per_class):
            shape = world.UNKNOWN_SHAPES[k % 2] if cls == "other" else cls
            word = world.PLACEHOLDER_WORDS[k % 20] if cls == "other" else world.default_word(shape)
            colour = list(world.COLOURS)[int(rng.integers(8))]
            background = list(world.BACKGROUNDS)[int(rng.integers(3))]
            items.append(world.Item(shape, colour, background, word))
    return items


def test_render_is_deterministic_in_the_seed():
    items = world.random_items(24, np.random.default_rng(1), ["old", "unknown", "concept"])
    a, ma = world.render_batch(items, seed=5)
    b, mb = world.render_batch(items, seed=5)
    c, _ = world.render_batch(items, seed=6)
    assert a.shape == (24, 3, 16, 16) and ma.shape == (24, 16, 16)
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1 and ma.min() >= 0 and ma.max() <= 1


@pytest.mark.parametrize("shape", world.ALL_SHAPES)
def test_outline_reaches_the_outer_radius_and_no_further(shape):
    rng = np.random.default_rng(3)
    for radius, cx, cy in [(5.5, 7.0, 9.0), (6.5, 9.0, 7.0), (6.0, 8.3, 8.0)]:
        inside = world.outline_inside(shape, radius, cx, cy, rng)
        dist = np.hypot(world.GRID_X - cx, world.GRID_Y - cy)[inside]
        assert dist.max() <= radius + 1e-9
        # the grid samples every 0.25 px; a thin spike's tip can fall between samples
        assert dist.max() >= radius - (1.0 if shape == "spiky" else 0.5)


def test_renders_are_centred_and_sized():
    """Circles: the mask's centroid is the centre (image centre +- 1), its area that of a 5.5-6.5 px disc."""
    _, masks = world.render_batch([world.known_item("circle", "red", "black")] * 200, seed=2)
    ys, xs = torch.meshgrid(torch.arange(16.0) + 0.5, torch.arange(16.0) + 0.5, indexing="ij")
    area = masks.sum(dim=(1, 2))
    cx, cy = (masks * xs).sum(dim=(1, 2)) / area, (masks * ys).sum(dim=(1, 2)) / area
    assert ((cx - 8).abs().max() <= 1.05) and ((cy - 8).abs().max() <= 1.05)
    assert (cx - 8).abs().max() > 0.8  # the jitter is really used
    radius = (area / math.pi).sqrt()
    assert radius.min() >= 5.4 and radius.max() <= 6.6 and radius.max() - radius.min() > 0.7


def test_captions_follow_the_grammar():
    items = world.old_items() + world.concept_items()
    items += world.random_items(300, np.random.default_rng(0), {"old": 1, "unknown": 2, "concept": 1})
    vocab = set(world.VOCABULARY)
    for item in items:
        words = item.caption.split(" ")
        assert len(words) == 7 and set(words) <= vocab
        assert words[0] == "a" and words[3:] == ["on", "a", item.background, "background"]
        assert words[1] == item.colour and words[2] == item.word
        assert item.word == {"star": "zorp"}.get(item.shape, item.shape) or item.word in world.PLACEHOLDER_WORDS
    assert world.VOCABULARY == sorted(set(world.VOCABULARY))
    assert len(set(world.PLACEHOLDER_WORDS)) == 20
    assert len(world.VOCABULARY) == 3 + 8 + 3 + 5 + 1 + 20  # every word distinct
    assert {i.shape for i in items} == set(world.ALL_SHAPES)


def test_prompt_sets():
    assert len(world.old_items()) == 120 and len(world.concept_items()) == 24
    train, heldout = world.train_concept_items(), world.heldout_concept_items()
    assert len(train) == 8 and len(heldout) == 16
    assert set(train) | set(heldout) == set(world.concept_items()) and not set(train) & set(heldout)
    assert {c for c, _ in world.TRAIN_CONCEPT_COMBOS} == set(world.COLOURS)
    assert {b for _, b in world.TRAIN_CONCEPT_COMBOS} == set(world.BACKGROUNDS)


def test_palette_is_distinct():
    colours = [world.rgb01(c) for c in world.COLOURS.values()]
    backgrounds = [world.rgb01(c) for c in world.BACKGROUNDS.values()]
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)) > 0.3
    assert min(np.linalg.norm(a - b) for a in colours for b in backgrounds) > 0.45


def test_spiky_polygons_never_have_five_points():
    rng = np.random.default_rng(0)
    outlines = [world.spiky_vertices(6.0, 8.0, 8.0, rng) for _ in range(300)]
    assert {len(v) // 2 for v in outlines} == set(world.SPIKE_COUNTS)
    assert all(abs(np.hypot(v[:, 0] - 8, v[:, 1] - 8).max() - 6) < 1e-9 for v in outlines)


def test_reference_from_image_recovers_the_mask():
    combos = itertools.product(("circle", "cross", "star"), world.COLOURS, world.BACKGROUNDS)
    items = [world.known_item(s, c, b) for s, c, b in combos]
    items += [world.Item(s, "pink", "white", "dax") for s in world.UNKNOWN_SHAPES]
    images, masks = world.render_batch(items, seed=4)
    errors = [np.abs(world.estimate_mask(img) - m.numpy()).mean() for img, m in zip(images, masks)]
    assert max(errors) < 0.1
    ref = world.reference_from_image(images[0], seed=1)
    assert torch.equal(ref, world.reference_from_image(images[0], seed=1))
    assert np.abs(world.estimate_mask(ref) - masks[0].numpy()).mean() < 0.1


def test_random_colour_references_use_random_contrasting_colours():
    _, masks = world.render_batch([world.known_item("square", "red", "gray")] * 8, seed=0)
    refs = world.references_from_masks(masks, seed=3, style="random_colours")
    corners = (refs[:, :, 0, 0] + 1) / 2
    centres = (refs[:, :, 8, 8] + 1) / 2
    assert ((corners - centres).norm(dim=1) >= world.REFERENCE_MIN_CONTRAST - 1e-5).all()
    assert len({tuple(c.tolist()) for c in centres}) == 8  # a new colour each time
    ref = world.reference_from_mask(masks[0], np.random.default_rng(0), style="random_colours")
    assert ref.shape == (3, 16, 16) and ref.min() >= -1 and ref.max() <= 1


def test_silhouette_references_are_white_on_black_whatever_the_target_colour():
    _, masks = world.render_batch([world.known_item("square", c, "gray") for c in ("red", "blue")], seed=0)
    refs = world.references_from_masks(masks, seed=3)  # the default style: the shipped base's
    assert torch.equal(refs[:, :, 0, 0], -torch.ones(2, 3)) and torch.equal(refs[:, :, 8, 8], torch.ones(2, 3))


def test_pairs_and_conversions_round_trip(tmp_path):
    items = world.concept_items()[:3]
    out = world.write_pairs(tmp_path / "pairs", items, seed=9)
    images, _ = world.render_batch(items, seed=9)
    for i, (item, image) in enumerate(zip(items, images)):
        assert (out / f"{i:06d}.txt").read_text(encoding="utf-8").strip() == item.caption
        loaded = np.asarray(Image.open(out / f"{i:06d}.png"))
        assert loaded.shape == (16, 16, 3) and np.array_equal(loaded, world.to_uint8(image))
        assert (world.from_pil(Image.open(out / f"{i:06d}.png")) - image).abs().max() <= 1 / 255 + 1e-6
    assert world.from_uint8(world.to_uint8(images)).shape == images.shape


def test_shipped_classifier_reads_fresh_renders(evaluator):
    items = _items_per_class(30, TEST_SEED)
    images, _ = world.render_batch(items, TEST_SEED)
    acc = metrics.attribute_accuracy(evaluator, images, items)
    assert acc["shape"] >= 0.97 and acc["colour"] >= 0.97 and acc["background"] >= 0.99
    pred = classify(evaluator, images)
    assert pred["features"].shape == (210, 128)
    # the star and the spiky polygons never pass for one another
    spiky = [p for p, i in zip(pred["shape"], items) if i.shape == "spiky"]
    stars = [p for p, i in zip(pred["shape"], items) if i.shape == "star"]
    assert "star" not in spiky and stars.count("star") >= 29


def test_frechet_distance_constructed_cases():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(400, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    same = metrics.frechet_distance(feats, feats)
    scale = float(torch.trace(torch.cov(feats.T.double())))
    assert abs(same) < 1e-6 * scale
    shift = torch.linspace(-1, 1, 16)
    moved = metrics.frechet_distance(feats, feats + shift)
    assert moved == pytest.approx(float((shift**2).sum()), rel=1e-3)
    other = torch.randn(400, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    assert metrics.frechet_distance(feats, other) > moved


def test_sharpness_and_palette_distance_move_as_documented():
    items = world.random_items(64, np.random.default_rng(0), ["old", "concept"])
    images, _ = world.render_batch(items, seed=0)
    noisy = (images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    blurred = gaussian_blur(images, 1.0)
    assert metrics.sharpness(noisy) > metrics.sharpness(images) > metrics.sharpness(blurred)
    assert metrics.palette_distance(noisy) > metrics.palette_distance(images)
    assert metrics.palette_distance(images) < 0.05  # only antialiased edges leave the palette
    flat = torch.tensor(world.rgb01(world.COLOURS["cyan"])).float().view(1, 3, 1, 1).expand(2, 3, 16, 16) * 2 - 1
    assert metrics.sharpness(flat) == 0 and metrics.palette_distance(flat) < 1e-6


def test_reference_stats_without_and_with_the_evaluator(evaluator):
    plain = metrics.reference_stats(world.heldout_concept_items(), seed=1)
    assert set(plain) == {"sharpness", "palette_distance", "count"} and plain["count"] == 16
    full = metrics.reference_stats(world.heldout_concept_items(), seed=1, model=evaluator, repeats=4)
    assert full["acc_shape"] >= 0.9 and full["frechet"] >= 0 and full["count"] == 64
