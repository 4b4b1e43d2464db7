"""The shipped toy base: it loads through the spec, its teacher branch is really in-context, and a
few D-OPSD steps through the project's own path (shards, cached contexts, trainer) teach it the
new concept. Margins are stated below; the measured values are in the base's toyworld.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dopsd_scale.config import load_config
from dopsd_scale.models import detect_spec_name, get_spec
from dopsd_scale.toyworld import world
from dopsd_scale.toyworld.base import read_world
from dopsd_scale.toyworld.classifier import load_classifier
from dopsd_scale.toyworld.evaluate import ToyModel, generate, repeat_items
from dopsd_scale.toyworld.experiment import BASE, CONFIG, make_concept_data
from dopsd_scale.toyworld.metrics import attribute_accuracy
from dopsd_scale.trainer import Trainer

pytestmark = pytest.mark.skipif(not (BASE / "toyworld.json").is_file(), reason="the toy base is not shipped here")

# 48 held-out concept prompts (16 colour/background combinations x 3 seeds), one fixed noise seed
CONCEPT = repeat_items(world.heldout_concept_items(), 3)
IN_CONTEXT_MARGIN = 0.5  # the teacher's star accuracy exceeds the prompt-only one by at least this
LEARNED_MARGIN = 0.2  # after the short D-OPSD run, the student's star accuracy rises by at least this


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _concept_accuracy(toy: ToyModel, classifier, references=None) -> float:
    images = generate(toy, [i.caption for i in CONCEPT], seed=123, references=references)
    return attribute_accuracy(classifier, images, CONCEPT)["shape"]


def test_the_shipped_base_loads_through_the_spec():
    assert detect_spec_name(BASE) == "toyworld"
    spec = get_spec("toyworld", BASE)
    info = read_world(BASE)
    assert spec.sample_steps == 4 and spec.latent_shape(16, 16) == (3, 16, 16)
    assert info["reference_style"] == "silhouette" and "measured" in info
    toy = ToyModel.load(BASE)
    images = generate(toy, ["a red circle on a white background"], seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_the_teacher_branch_is_in_context(classifier):
    """Shown the star's silhouette, the same network draws the unseen concept; from the prompt alone it
    cannot (the word was never trained)."""
    toy = ToyModel.load(BASE)
    _, masks = world.render_batch(CONCEPT, seed=7)
    refs = world.references_from_masks(masks, seed=8, style=toy.spec.reference_style)
    teacher = _concept_accuracy(toy, classifier, references=refs)
    student = _concept_accuracy(toy, classifier)
    print(f"star accuracy: teacher in-context {teacher:.3f}, prompt only {student:.3f}")
    assert teacher >= student + IN_CONTEXT_MARGIN


def test_a_few_dopsd_steps_teach_the_new_concept(tmp_path, classifier):
    features = make_concept_data(tmp_path / "data")
    cfg = load_config(
        str(CONFIG),
        [
            f"model.path={BASE}",
            f"data.path={features}",
            f"run.output_dir={tmp_path / 'run'}",
            "run.max_steps=60",
            "metrics.val_every=-1",
            "checkpoint.save_final=false",
            "checkpoint.export_final=false",
            "checkpoint.every_steps=0",
        ],
    )
    trainer = Trainer(cfg)
    before = _concept_accuracy(ToyModel(trainer.spec, trainer.model, *_encoder(trainer)), classifier)
    trainer.fit()
    after = _concept_accuracy(ToyModel(trainer.spec, trainer.model, *_encoder(trainer)), classifier)
    print(f"star accuracy of the prompt-only student: {before:.3f} -> {after:.3f} in 60 D-OPSD steps")
    assert after >= before + LEARNED_MARGIN


def _encoder(trainer: Trainer) -> tuple:
    from dopsd_scale.encoders.text import PromptEncoder

    return PromptEncoder.from_pipeline(Path(trainer.cfg.model.path)), {}
