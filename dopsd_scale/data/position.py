"""Where a reader stands in its data, and how a run resumes on another layout.

The stream is a pure function of the shard list, the seed, the layout (world size x DataLoader
workers = "slots") and an optional :class:`Plan`:
  - epoch e deals the shards, shuffled with the seed and e, round-robin over the slots:
    slot `rank + world_size * worker` reads `order[slot::slots]`;
  - a plan replaces ONE epoch's shard list by the shards still owed in it (after a resume on
    another layout); later epochs are dealt normally again.
Each slot runs its own epochs (the DataLoader takes one batch from each worker in turn, so a
worker whose shards hold fewer samples starts its next epoch earlier). Every batch carries its
slot's epoch and the shards of that epoch it has delivered completely ("done"); the loader keeps
the latest of these per worker, which is all a resume on another layout needs:

Resume on the same layout (world size, workers, seed, batch size, shards): exact. The state holds
the batches consumed; the stream is replayed (reading metadata only, no tensor decoding) and
continues with exactly the batches the uninterrupted run would have produced.

Resume on another layout, given the states of ALL old ranks: the earliest epoch E any old worker
was in is finished first, with the shards of E that no old worker had completely delivered, dealt
over the new slots; then epochs E+1, ... follow on the new layout. Guarantees:
  - no sample is skipped (except, as in every epoch, a bucket's last partial batch);
  - repeated are only (a) samples already delivered from shards an old worker had started but
    not finished (at most its shuffle buffer plus its pending bucket remainders plus one shard),
    and (b) what old workers already in epoch E+1 had delivered of it.
Given the state of only some old ranks, the layout change restarts epoch E (repeats up to one
epoch, skips nothing). A changed shard list restarts at epoch 0 (the data is not the same).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)
STATE_VERSION = 2


@dataclass
class Plan:
    """Epoch `epoch` reads only `shards` (names, in order); later epochs are whole."""

    epoch: int
    shards: list[str]

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "shards": list(self.shards)}

    @classmethod
    def from_json(cls, data: Optional[dict]) -> Optional[Plan]:
        return None if not data else cls(int(data["epoch"]), list(data["shards"]))


def epoch_order(names: list[str], seed: int, epoch: int) -> list[str]:
    """The shard order of a whole epoch (the same on every rank and worker)."""
    order = list(names)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def epoch_shards(names: list[str], seed: int, epoch: int, plan: Optional[Plan]) -> tuple[list[str], bool]:
    """(the epoch's shard list, whether it is a plan's partial epoch)."""
    if plan is not None and epoch == plan.epoch:
        return list(plan.shards), True
    return epoch_order(names, seed, epoch), False


def worker_share(consumed: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` delivered out of `consumed`, given the loader's round-robin."""
    return consumed // num_workers + (1 if worker < consumed % num_workers else 0)


def same_layout(state: dict, current: dict) -> bool:
    """Whether `state` can be resumed exactly (a first-version state has no shard digest: its
    stream was the same function of the layout, so it is compared without one)."""
    keys = ("world_size", "num_workers", "seed", "batch_size") + (("shards_digest",) if "version" in state else ())
    return all(state.get(k) == current.get(k) for k in keys)


def elastic_plan(states: list[dict], names: list[str]) -> Plan:
    """The plan that finishes the old run's earliest unfinished epoch on a new layout.

    `states` are the old ranks' state dicts (all from one checkpoint), `names` the shard names
    in spec order (the same list the old run had: the caller checked the digest).
    """
    old = states[0]
    world, workers = int(old["world_size"]), max(1, int(old["num_workers"]))
    slots, seed = world * workers, int(old["seed"])
    old_plan = Plan.from_json(old.get("plan"))
    start = old_plan.epoch if old_plan else 0
    positions: dict[int, tuple[int, list[str]]] = {}
    for st in states:
        for w, pos in (st.get("workers") or {}).items():
            positions[int(st["rank"]) + world * int(w)] = (int(pos["epoch"]), list(pos["done"]))
    if sorted(int(s["rank"]) for s in states) != list(range(world)):
        epoch = min((e for e, _ in positions.values()), default=start)
        log.warning(
            "resume on another layout with the positions of %d of %d ranks: epoch %d restarts",
            len(states),
            world,
            epoch,
        )
        return Plan(epoch, epoch_shards(names, seed, epoch, old_plan)[0])
    for slot in range(slots):  # a worker that delivered nothing yet is at the start
        positions.setdefault(slot, (start, []))
    epoch = min(e for e, _ in positions.values())
    order, _ = epoch_shards(names, seed, epoch, old_plan)
    done = set(names) - set(order)  # outside a plan's list: delivered before that plan began
    for slot in range(slots):
        slot_epoch, slot_done = positions[slot]
        done |= set(order[slot::slots]) if slot_epoch > epoch else set(slot_done)
    remaining = [n for n in order if n not in done]
    log.info(
        "resume on another layout: epoch %d continues with %d of its %d shard(s)", epoch, len(remaining), len(order)
    )
    return Plan(epoch, remaining)
