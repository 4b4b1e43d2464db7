"""The offline task pool (cache-features, eval): retries, failure reports, a dead actor replaced,
model affinity; in this process and on a real local Ray cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dopsd_scale.task_pool import LocalPool, make_pool


class Worker:
    """Holds one "model" at a time; task kinds: ok, flaky (fails its first try), broken (always
    fails), dies (kills its process on the first try; a marker file remembers across actors)."""

    def __init__(self, opts: dict):
        self.marks = Path(opts["marks"])
        self.loaded, self.loads = None, 0

    def run(self, task: dict) -> dict:
        mark = self.marks / task["name"]
        first = not mark.exists()
        mark.touch()
        if task["kind"] == "broken" or (task["kind"] == "flaky" and first):
            raise ValueError(f"{task['name']} cannot be done")
        if task["kind"] == "dies" and first:
            os._exit(1)
        if task.get("model") != self.loaded:
            self.loaded, self.loads = task.get("model"), self.loads + 1
        return {"name": task["name"], "loads": self.loads, "pid": os.getpid()}


def tasks(*kinds: str) -> list[dict]:
    return [{"name": f"{kind}{i}", "kind": kind} for i, kind in enumerate(kinds)]


def test_local_pool_retries_and_reports_what_still_fails(tmp_path):
    pool = LocalPool(Worker, {"marks": str(tmp_path)}, retries=1)
    done = []
    failed = pool.run(tasks("ok", "flaky", "broken", "ok"), lambda r: done.append(r["name"]))
    assert done == ["ok0", "flaky1", "ok3"]
    assert [(f["name"], f["tries"]) for f in failed] == [("broken2", 2)]
    assert "ValueError: broken2 cannot be done" in failed[0]["error"]


@pytest.fixture(scope="module")
def ray(local_ray):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import tests/
    return local_ray


def test_ray_pool_replaces_a_dead_actor_and_retries_its_tasks(ray, tmp_path):
    pool = make_pool(Worker, {"marks": str(tmp_path), "device": "cpu"}, 2, None, retries=1)
    done = {}
    failed = pool.run(tasks("ok", "dies", "flaky", "broken", "ok", "ok"), lambda r: done.update({r["name"]: r}))
    pool.close()
    assert sorted(done) == ["dies1", "flaky2", "ok0", "ok4", "ok5"]
    assert [(f["name"], f["tries"]) for f in failed] == [("broken3", 2)]
    assert "ValueError" in failed[0]["error"]


@pytest.mark.parametrize("affinity, loads", [(None, 4), (lambda task: task["model"], 2)])
def test_an_actor_takes_the_tasks_of_the_model_it_holds_first(ray, tmp_path, affinity, loads):
    pool = make_pool(Worker, {"marks": str(tmp_path), "device": "cpu"}, 1, None, retries=0, affinity=affinity)
    work = [{"name": f"t{i}", "kind": "ok", "model": f"m{i % 2}"} for i in range(4)]
    results = []
    assert pool.run(work, results.append) == []
    pool.close()
    assert max(r["loads"] for r in results) == loads
