"""The reader's position: exact resume on the same layout, the documented guarantees on another."""

from __future__ import annotations

import json
import logging

import pytest

from dopsd_scale.data.reader import build_loader

from .conftest import write_feature_shards
from .test_reader_split import epochs

DIM = 8
ALL = {f"{i:06d}" for i in range(40)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_feature_shards(tmp_path_factory.mktemp("resume") / "feats", num_shards=8, per_shard=5)


def loader_for(shards, rank=0, world=1, workers=0, batch_size=1, seed=3):
    return build_loader(
        str(shards),
        batch_size=batch_size,
        feature_dim=DIM,
        num_workers=workers,
        shuffle_buffer=4,
        seed=seed,
        rank=rank,
        world_size=world,
    )


def take(loader, n):
    return [(tuple(b.keys), b.bucket, b.epoch) for b in (next(loader) for _ in range(n))]


def json_state(loader):
    return json.loads(json.dumps(loader.state_dict()))  # it must survive JSON


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_the_identical_remaining_batches(shards, workers):
    straight = take(loader_for(shards, workers=workers, batch_size=2), 30)  # crosses into epoch 1
    first = loader_for(shards, workers=workers, batch_size=2)
    take(first, 7)
    resumed = loader_for(shards, workers=workers, batch_size=2)
    resumed.load_state_dict(json_state(first))
    assert take(resumed, 23) == straight[7:]


def _run_then_resume(shards, old_layout, new_layout, consumed, give_ranks=None):
    """Consume `consumed` batches on every old rank, resume on the new layout with the given
    ranks' states; returns (keys seen before, {new epoch: keys}, the old states)."""
    old_world, old_workers = old_layout
    states, before = [], []
    for rank in range(old_world):
        loader = loader_for(shards, rank, old_world, old_workers)
        before += [k for b in (next(loader) for _ in range(consumed)) for k in b.keys]
        states.append(json_state(loader))
    given = states if give_ranks is None else [states[r] for r in give_ranks]
    world, workers = new_layout
    after: dict[int, list[str]] = {}
    for rank in range(world):
        loader = loader_for(shards, rank, world, workers)
        loader.load_state_dict(given)
        for epoch, batches in epochs(loader, workers, last=1).items():
            after.setdefault(epoch, []).extend(k for b in batches for k in b.keys)
    return before, after, states


def _shards_not_done(states) -> set[str]:
    done = {n for s in states for w in s["workers"].values() for n in w["done"]}
    return {f"features-{i:06d}.tar" for i in range(8)} - done


def _keys_of(shard_names) -> set[str]:
    return {f"{int(n[9:15]) * 5 + j:06d}" for n in shard_names for j in range(5)}


@pytest.mark.parametrize("old,new,consumed", [((1, 0), (2, 0), 14), ((2, 2), (1, 0), 18), ((2, 0), (1, 2), 12)])
def test_another_layout_skips_nothing_and_repeats_only_what_the_docs_allow(shards, old, new, consumed):
    before, after, states = _run_then_resume(shards, old, new, consumed)
    assert set(before) | set(after[0]) == ALL  # no sample of the interrupted epoch is skipped
    assert len(after[0]) == len(set(after[0]))
    repeated = set(before) & set(after[0])
    assert repeated <= _keys_of(_shards_not_done(states))  # only from shards started, not finished
    assert len(repeated) < len(before) / 2  # the finished shards are not read again
    assert sorted(after[1]) == sorted(ALL)  # the next epoch is whole, on the new layout


def test_another_layout_with_some_ranks_states_restarts_the_epoch(shards, caplog):
    with caplog.at_level(logging.WARNING):
        before, after, _ = _run_then_resume(shards, (2, 0), (1, 0), consumed=6, give_ranks=[0])
    assert "epoch 0 restarts" in caplog.text
    assert sorted(after[0]) == sorted(ALL)


def test_resume_after_a_layout_change_is_exact_again(shards):
    old = loader_for(shards, 0, 1, 0)
    take(old, 9)
    plan_state = json_state(old)
    a = loader_for(shards, 0, 2, 0)
    a.load_state_dict([plan_state])
    straight = take(a, 25)
    b = loader_for(shards, 0, 2, 0)
    b.load_state_dict([plan_state])
    take(b, 4)
    c = loader_for(shards, 0, 2, 0)
    c.load_state_dict(json_state(b))
    assert c.state_dict()["plan"] == a.state_dict()["plan"] and c.state_dict()["plan"] is not None
    assert take(c, 21) == straight[4:]


def test_changed_shards_restart_at_epoch_zero(shards, tmp_path, caplog):
    other = write_feature_shards(tmp_path / "other", num_shards=6, per_shard=5)
    old = loader_for(shards)
    take(old, 12)
    new = build_loader(str(other), batch_size=1, feature_dim=DIM, shuffle_buffer=4, seed=3)
    with caplog.at_level(logging.WARNING):
        new.load_state_dict(json_state(old))
    assert "restarts at epoch 0" in caplog.text
    assert take(new, 3) == take(build_loader(str(other), batch_size=1, feature_dim=DIM, shuffle_buffer=4, seed=3), 3)
