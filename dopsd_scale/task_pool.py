"""Where offline tasks run: in this process, or on Ray actors (one per GPU), with retries.

Used by `cache-features` (a task is a shard; the worker holds the encoders) and by `dopsd eval`
(a task is a (model, prompt set, seed) triple; the worker holds one model at a time). A worker
class is constructed from one JSON-able `opts` dict and has `run(task) -> dict`; every task has a
`name`. A task that raises is retried, on any actor, up to `retries` more times; an actor that
dies is replaced and its task retried. A task that still fails comes back in the failed list as
`{**task, "error", "tries"}`: the other tasks go on, and the caller reports it.

Ray: with no address the pool starts a private local cluster (`ray.init(address="local")`, not
a plain `ray.init()` that may attach to a stale cluster file) on loopback; with an address
(`auto` or `host:port`) it joins that cluster, whose nodes must all see the directories the
tasks name. Nothing large travels through Ray: tasks and results are small dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

log = logging.getLogger(__name__)
OnResult = Callable[[dict], None]
Affinity = Callable[[dict], Any]


def _failure(task: dict, error: str, attempt: int) -> dict:
    return {**task, "error": error, "tries": attempt + 1}


class LocalPool:
    """Runs the tasks one after the other in this process."""

    def __init__(self, worker_cls: type, opts: dict, retries: int, noun: str = "task"):
        self.worker, self.retries, self.noun = worker_cls(opts), retries, noun

    def first(self, method: str, *args):
        """Call a method of the worker (e.g. what it holds, for a manifest)."""
        return getattr(self.worker, method)(*args)

    def run(self, tasks: list[dict], on_result: OnResult) -> list[dict]:
        failed = []
        for task in tasks:
            for attempt in range(self.retries + 1):
                try:
                    on_result(self.worker.run(task))
                    break
                except Exception as err:  # a broken task: retry, then report
                    log.warning("%s %s failed (try %d): %s", self.noun, task["name"], attempt + 1, err)
                    if attempt == self.retries:
                        failed.append(_failure(task, f"{type(err).__name__}: {err}", attempt))
        return failed

    def close(self) -> None:
        self.worker = None


class RayPool:
    """`actors` Ray actors holding a worker each (one GPU each when `opts["device"]` is cuda).
    With `affinity`, an idle actor first takes a queued task with the same key as its last one
    (e.g. the model it has loaded)."""

    def __init__(
        self,
        worker_cls: type,
        opts: dict,
        actors: int,
        address: Optional[str] = None,
        retries: int = 2,
        noun: str = "task",
        affinity: Optional[Affinity] = None,
        object_store_mb: Optional[int] = None,
    ):
        ray = init_ray(address, object_store_mb)
        self.ray, self.opts, self.retries, self.noun, self.affinity = ray, opts, retries, noun, affinity
        gpu = str(opts["device"]).startswith("cuda")
        self.actor_cls = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)(worker_cls)
        self.actors = [self.actor_cls.remote(opts) for _ in range(actors)]
        self.holds: list[Any] = [None] * actors  # each actor's last affinity key

    def first(self, method: str, *args):
        return self.ray.get(getattr(self.actors[0], method).remote(*args))

    def _pick(self, queue: list, actor: int) -> tuple[dict, int]:
        if self.affinity is not None:
            for k, (task, _) in enumerate(queue):
                if self.affinity(task) == self.holds[actor]:
                    return queue.pop(k)
        return queue.pop(0)

    def _submit(self, queue: list, idle: list, running: dict) -> None:
        while queue and idle:
            a = idle.pop(0)
            task, attempt = self._pick(queue, a)
            self.holds[a] = self.affinity(task) if self.affinity is not None else None
            running[self.actors[a].run.remote(task)] = (a, task, attempt)

    def run(self, tasks: list[dict], on_result: OnResult) -> list[dict]:
        ray = self.ray
        queue, idle, running, failed = [(t, 0) for t in tasks], list(range(len(self.actors))), {}, []
        while queue or running:
            self._submit(queue, idle, running)
            [ref], _ = ray.wait(list(running), num_returns=1)
            a, task, attempt = running.pop(ref)
            result, error = None, ""
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                log.warning("actor %d died on %s %s: %s; replacing it", a, self.noun, task["name"], err)
                self.actors[a], self.holds[a] = self.actor_cls.remote(self.opts), None
                error = f"actor died: {err}"
            except ray.exceptions.RayTaskError as err:
                error = f"{type(err.cause).__name__}: {err.cause}" if err.cause else str(err)
            idle.append(a)
            if result is not None:
                on_result(result)
            elif attempt < self.retries:
                log.warning("%s %s failed (try %d): %s; retrying", self.noun, task["name"], attempt + 1, error)
                queue.append((task, attempt + 1))
            else:
                failed.append(_failure(task, error, attempt))
        return failed

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def init_ray(address: Optional[str], object_store_mb: Optional[int] = None):
    """Join `address`, or start a private loopback cluster; returns the `ray` module."""
    import ray

    if not ray.is_initialized():
        kwargs: dict = {}
        if not address:  # a private cluster: loopback only
            kwargs = {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
            if object_store_mb:
                kwargs["object_store_memory"] = object_store_mb << 20
        ray.init(address=address or "local", log_to_driver=False, **kwargs)
    return ray


def make_pool(
    worker_cls: type,
    opts: dict,
    workers: int,
    address: Optional[str],
    retries: int,
    noun: str = "task",
    affinity: Optional[Affinity] = None,
    object_store_mb: Optional[int] = None,
):
    """In this process when `workers` is 0 and no cluster address is given, else Ray actors
    (with an address and no count: one per GPU of the cluster, or one per CPU without GPUs)."""
    if workers <= 0 and not address:
        return LocalPool(worker_cls, opts, retries, noun)
    if workers <= 0:
        ray = init_ray(address)
        key = "GPU" if str(opts["device"]).startswith("cuda") else "CPU"
        workers = max(1, int(ray.cluster_resources().get(key, 1)))
    return RayPool(worker_cls, opts, workers, address, retries, noun, affinity, object_store_mb)
