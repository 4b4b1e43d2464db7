"""Where caching tasks run: in this process, or on Ray actors (one per GPU, whole shards per task).

Both pools offer the same three calls: `producer()` (what the encoders are, for the manifest),
`run(tasks, on_result)` and `write_val_prompts(...)`. A task that raises is retried, on any
actor, up to `retries` more times; an actor that dies is replaced and its task retried. A task
that still fails is returned as failed: the other shards go on, and the caller reports it.

Ray: with no address the pool starts a private local cluster (`ray.init(address="local")`, not
a plain `ray.init()` that may attach to a stale cluster file), limited to this machine's CPUs
(and GPUs) and to `object_store_mb` of object store; with an address (`auto` or `host:port`)
it joins that cluster, whose nodes must all see the input and output directories. Nothing
large travels through Ray: tasks are shard names, results are counts and report rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Optional

from .encode_shard import ShardEncoder

log = logging.getLogger(__name__)
OnResult = Callable[[dict], None]


class LocalPool:
    """Runs tasks one after the other in this process."""

    def __init__(self, opts: dict, retries: int = 2):
        self.worker, self.retries = ShardEncoder(opts), retries

    def producer(self) -> dict:
        return self.worker.producer()

    def write_val_prompts(self, path: str, prompts: list[str]) -> None:
        self.worker.write_val_prompts(path, prompts)

    def run(self, tasks: list[dict], on_result: OnResult) -> list[dict]:
        failed = []
        for task in tasks:
            for attempt in range(self.retries + 1):
                try:
                    on_result(self.worker.run(task))
                    break
                except Exception as err:  # a broken shard: retry, then report
                    log.warning("shard %s failed (try %d): %s", task["name"], attempt + 1, err)
                    if attempt == self.retries:
                        failed.append({**task, "error": f"{type(err).__name__}: {err}", "tries": attempt + 1})
        return failed

    def close(self) -> None:
        pass


class RayPool:
    """`actors` Ray actors, each holding the encoders; one GPU each when `device` is cuda."""

    def __init__(
        self, opts: dict, actors: int, address: Optional[str] = None, retries: int = 2, object_store_mb: int = 512
    ):
        import ray

        if not ray.is_initialized():
            kwargs = (
                {}
                if address
                else {
                    "object_store_memory": object_store_mb << 20,
                    "include_dashboard": False,
                    "_node_ip_address": "127.0.0.1",
                }
            )  # a private cluster: loopback only
            ray.init(address=address or "local", log_to_driver=False, **kwargs)
        self.ray, self.opts, self.retries = ray, opts, retries
        gpu = str(opts["device"]).startswith("cuda")
        self.actor_cls = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)(ShardEncoder)
        self.actors = [self._new_actor() for _ in range(actors)]

    def _new_actor(self):
        return self.actor_cls.remote(self.opts)

    def producer(self) -> dict:
        return self.ray.get(self.actors[0].producer.remote())

    def write_val_prompts(self, path: str, prompts: list[str]) -> None:
        self.ray.get(self.actors[0].write_val_prompts.remote(path, prompts))

    def run(self, tasks: list[dict], on_result: OnResult) -> list[dict]:
        ray = self.ray
        queue = [(t, 0) for t in tasks]
        idle = list(range(len(self.actors)))
        running: dict = {}  # object ref -> (actor index, task, attempt)
        failed = []
        while queue or running:
            while queue and idle:
                task, attempt = queue.pop(0)
                a = idle.pop(0)
                running[self.actors[a].run.remote(task)] = (a, task, attempt)
            [ref], _ = ray.wait(list(running), num_returns=1)
            a, task, attempt = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                log.warning("actor %d died on shard %s: %s; replacing it", a, task["name"], err)
                self.actors[a] = self._new_actor()
                result, error = None, f"actor died: {err}"
            except ray.exceptions.RayTaskError as err:
                result, error = None, f"{type(err.cause).__name__}: {err.cause}" if err.cause else str(err)
            idle.append(a)
            if result is not None:
                on_result(result)
            elif attempt < self.retries:
                log.warning("shard %s failed (try %d): %s; retrying", task["name"], attempt + 1, error)
                queue.append((task, attempt + 1))
            else:
                failed.append({**task, "error": error, "tries": attempt + 1})
        return failed

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def make_pool(opts: dict, actors: int, address: Optional[str], retries: int, object_store_mb: int = 512):
    """In-process when `actors` is 0 and no cluster address is given, else Ray actors."""
    if actors <= 0 and not address:
        return LocalPool(opts, retries)
    if actors <= 0:  # joined a cluster without a count: one actor per GPU (or per 1 CPU on CPU)
        import ray

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        key = "GPU" if str(opts["device"]).startswith("cuda") else "CPU"
        actors = max(1, int(ray.cluster_resources().get(key, 1)))
    return RayPool(opts, actors, address, retries, object_store_mb)
