"""Benchmark: our Trainer's step time beside a bare hand-written loop doing the same D-OPSD math,
and (`--lora`) LoRA against full D-OPSD in the trainer.

    python -m dopsd_scale.bench --model runs/assets/zimage --data runs/features --ranks 1 2
    python -m dopsd_scale.bench --model runs/assets/zimage --data runs/features --lora

For each world size it launches both variants under torchrun (CPU, gloo), alternating, times the
optimizer steps after a warm-up, and prints one table with the ratio trainer / bare. The bare loop
uses the trainer's builders and the same parallel strategy (`none` on one rank, FSDP2 on more):
the same model, batch, roll-out, per-step backward, optimizer, clipping and EMA teacher, and none
of the trainer's machinery (keyed noise, step statistics, the non-finite check, LR schedule,
metrics and logging every `--log-every` steps, data-state tracking). Then, unless `--no-counts`:
the collectives per optimizer step for K in `--ks` with and without deferred gradient sync
(FSDP2, wrapped `torch.distributed` calls), and the host syncs of a logging and a non-logging
trainer step (`HostSyncCounter`). Timings are for reading by people, never for tests.

`--lora` runs the trainer on one rank with `model.finetune=full` and `=lora` (the default LoRA
targets, `--lora-rank`) and prints s/step, the process's peak resident memory (CPU: the whole
process, so it includes the libraries; on a GPU read `peak_mem_gib` in the run's metrics) and
the training state that LoRA shrinks: trainable weights + their gradients + AdamW's two moments
(plus the EMA teacher copy, a full model in full mode, an adapter in LoRA mode).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import resource
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from .distributed import shutdown_distributed

# ---- counting host syncs and collectives ---------------------------------------------------------
_READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__"}
_SIZED = {"nonzero", "masked_select", "unique", "argwhere"}
_COPIES = {"cpu", "to", "copy_"}
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class HostSyncCounter(TorchFunctionMode):
    """Counts the host's reads of device values inside a `with` block (a sync each on a GPU).

    Counted: `item`, `tolist`, `numpy`, `bool/float/int/index/format` of a tensor, copies of it to
    the CPU, and ops whose output size depends on its values (`nonzero`, `masked_select`, indexing
    by a boolean tensor). On a GPU a tensor is a device tensor when it lives there. On a CPU run
    every tensor is a host tensor, so device data is traced instead: the `params`, what `mark`
    is given (the batch and noise the trainer moves to its device), what a factory makes when
    given this very `device` object (the trainer's own, not a tensor's `.device`), and every new
    tensor computed from those. Reads of other tensors (schedules,
    the batch before its transfer, AdamW's step counts) are host reads, counted apart.
    `sites` names each read.
    """

    def __init__(self, device: torch.device | str = "cpu", params: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.device = device if isinstance(device, torch.device) else torch.device(device)
        self.traced = self.device.type == "cpu"
        self.counts = {"device": 0, "host": 0}
        self.sites: list[str] = []
        self._marked: dict[int, weakref.ref] = {}
        self.mark(list(params))

    def mark(self, obj) -> None:
        """Treat the tensors in `obj` (nested lists, dicts, dataclasses) as device data."""
        for t in _tensors(obj):
            self._marked[id(t)] = weakref.ref(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = list(_tensors((args, kwargs)))
        on_device = any(self._on_device(t) for t in inputs)
        if name in _READS and inputs or name in _SIZED or name == "__getitem__" and _bool_index(args):
            self._record(name, on_device)
        elif (
            not self.traced
            and name in _COPIES
            and isinstance(out, torch.Tensor)
            and out.device.type == "cpu"
            and on_device
        ):  # (traced on a CPU, the read that follows a copy is what counts)
            self._record(f"{name} to cpu", True)
        if self.traced:
            self._trace(name, args, kwargs, inputs, out, on_device)
        return out

    def _trace(self, name: str, args: tuple, kwargs: dict, inputs: list, out, on_device: bool) -> None:
        """New outputs of device inputs are device data, and so is an in-place op's target; tensors
        merely passed through (the grouping helpers of the foreach optimizers) keep what they were."""
        if name.endswith("_") and on_device and args:
            self.mark(args[0])
        if kwargs.get("device") is self.device:  # placed on the device on purpose, new or passed through
            self.mark(out)
        elif on_device:
            seen = {id(t) for t in inputs}
            self.mark([t for t in _tensors(out) if id(t) not in seen])

    def _on_device(self, t: torch.Tensor) -> bool:
        if not self.traced:
            return t.device.type != "cpu"
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def _record(self, name: str, on_device: bool) -> None:
        kind = "device" if on_device else "host"
        self.counts[kind] += 1
        self.sites.append(f"{kind}: {name} at {_site(sys._getframe(2))}")


def _site(frame) -> str:
    """`file:line function` of the first caller outside torch and this module."""
    while frame is not None and frame.f_code.co_filename.startswith((_TORCH_DIR, __file__)):
        frame = frame.f_back
    return "?" if frame is None else f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"


def _tensors(obj) -> Iterator[torch.Tensor]:
    """The tensors in nested args (lists for stack and the foreach ops, dicts for kwargs)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        yield from _tensors(vars(obj))


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class CollectiveCounter:
    """Counts the collectives issued through `torch.distributed` inside a `with` block (FSDP2's
    gradient reduce-scatters, its all-gathers, and all-reduces) by wrapping the module functions."""

    NAMES = {
        "reduce_scatter_single": "reduce_scatter",
        "reduce_scatter_tensor": "reduce_scatter",
        "reduce_scatter": "reduce_scatter",
        "all_reduce": "all_reduce",
        "all_gather_single": "all_gather",
        "all_gather_into_tensor": "all_gather",
        "all_gather": "all_gather",
    }

    def __init__(self):
        self.counts = {kind: 0 for kind in set(self.NAMES.values())}
        self._saved: dict = {}

    def __enter__(self) -> CollectiveCounter:
        for name, kind in self.NAMES.items():
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(self._saved[name], kind))
        return self

    def _wrap(self, fn, kind: str):
        def counted(*args, **kwargs):
            self.counts[kind] += 1
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _overrides(args: argparse.Namespace) -> list[str]:
    """The run both loops share: the config plus these (FSDP2 on more than one rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return [
        f"model.path={args.model}",
        f"data.path={args.data}",
        f"run.output_dir={args.out}",
        f"data.batch_size={args.batch_size}",
        f"run.max_steps={args.steps}",
        "metrics.val_every=-1",
        "metrics.tensorboard=false",
        "checkpoint.save_final=false",
        "checkpoint.export_final=false",
        "checkpoint.resume=none",
        "checkpoint.every_steps=0",
        f"metrics.log_every={args.log_every}",
        "model.attention_backend=sdpa",
        f"parallel.kind={'fsdp2' if world > 1 else 'none'}",
        "optim.lr=1e-4",
        "teacher.ema_decay=0.9999",
        f"model.finetune={args.finetune}",
        f"lora.rank={args.lora_rank}",
        f"lora.alpha={2 * args.lora_rank}",
        *args.set,
    ]


def _bare_worker(args: argparse.Namespace) -> list[float]:
    """The D-OPSD step written out by hand on the trainer's builders and its parallel strategy
    (`none` on one rank, FSDP2 on more), so that only the trainer's machinery differs: keyed
    per-sample noise, step statistics, the non-finite check, the LR schedule, FLOPs and metrics
    accounting and logging, data-state tracking."""
    from .builders import build_autocast, build_device, build_model
    from .config import load_config
    from .data.reader import build_loader
    from .distributed import init_distributed
    from .models import get_spec
    from .parallel import build_parallel

    cfg = load_config(args.config, _overrides(args))
    info = init_distributed()
    device = build_device(cfg.run, info)
    spec = get_spec(cfg.model.name, cfg.model.path)
    model = build_model(spec, cfg.model, device)
    strategy = build_parallel(cfg.parallel, info, device)
    strategy.setup(
        model, copy.deepcopy(model).requires_grad_(False).eval().float(), spec.sharding_units(model), cfg.optim
    )
    d = cfg.data
    loader = build_loader(
        d.path,
        d.batch_size,
        spec.feature_dim(model),
        d.num_workers,
        d.shuffle_buffer,
        d.seed,
        info.rank,
        info.world_size,
    )
    step = _BareStep(spec, strategy, cfg, build_autocast(cfg.run, device))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(next(loader).to(device, non_blocking=True))
        times.append(time.perf_counter() - t0)
    strategy.close()
    return times


class _BareStep:
    """Roll out K steps with a per-step backward, clip, step, EMA: the trainer's math, nothing else
    (every roll-out step trained, as `objective.steps=all`; an EMA teacher)."""

    def __init__(self, spec, strategy, cfg, autocast):
        self.spec, self.strategy, self.cfg, self.autocast = spec, strategy, cfg, autocast
        self.sigmas: dict = {}

    def velocity(self, model, x, sigma, cond):
        with self.autocast:
            return self.spec.velocity(model, x, sigma, cond)

    def __call__(self, batch) -> None:
        from .flow import schedule

        o, s = self.cfg.objective, self.strategy
        shape = self.spec.latent_shape(*batch.bucket)
        if batch.bucket not in self.sigmas:
            listed = o.sigmas if o.sigmas is not None else self.spec.train_sigmas(o.num_steps, shape, o.schedule)
            self.sigmas[batch.bucket] = schedule(listed)
        sigmas, k_steps = self.sigmas[batch.bucket], o.num_steps
        s.zero_grad()
        x = torch.randn(len(batch), *shape, device=batch.student.feats.device)
        for k in range(k_steps):
            s_k, s_next = float(sigmas[k]), float(sigmas[k + 1])
            sigma = torch.full((len(batch),), s_k, device=x.device)
            with torch.no_grad():
                v_t = self.velocity(s.teacher, x, sigma, batch.teacher)
            v_s = self.velocity(s.model, x, sigma, batch.student)
            s.backward(s_k**2 * torch.mean((v_s.float() - v_t.float()) ** 2) / k_steps, k == k_steps - 1)
            x = x + (s_next - s_k) * v_s.detach().float()
        s.clip_grad_norm(self.cfg.optim.grad_clip or float("inf"))
        s.optimizer_step()
        with torch.no_grad():
            torch._foreach_lerp_(s.local_params(s.teacher), s.local_params(s.model), 1.0 - self.cfg.teacher.ema_decay)


def _trainer_worker(args: argparse.Namespace) -> list[float]:
    from .config import load_config
    from .trainer import Trainer

    times = []
    with Trainer(load_config(args.config, _overrides(args))) as trainer:
        for _ in range(args.steps):  # the whole optimizer step: data, step, accounting, logging
            t0 = time.perf_counter()
            trainer._one_step()
            times.append(time.perf_counter() - t0)
        args.state_mib = _training_state_mib(trainer)
    return times


def _training_state_mib(trainer) -> float:
    """Trainable weights, their gradients, AdamW's two moments, and the EMA teacher's own weights."""
    trainable = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    teacher = trainer.teacher
    ema = sum(p.numel() * p.element_size() for p in teacher.module.parameters()) if teacher.owns_weights else 0
    if not teacher.owns_weights and getattr(teacher, "keys", ()):
        ema = trainable  # the teacher adapter: the student adapter's shapes, fp32
    return (4 * trainable + ema) / 2**20


def _counts_worker(args: argparse.Namespace) -> dict:
    """Per optimizer step of the trainer: collectives for each K with and without deferred gradient
    sync (FSDP2 on more than one rank), and host reads on a logging and a non-logging step.
    Step 1 is a warm-up, step 2 logs (`log_every` 2), step 3 does not."""
    from .config import load_config
    from .trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    out: dict = {"collectives": [], "syncs": {}}
    for defer in (False, True) if world > 1 else (False,):
        for k in args.ks:
            extra = [
                f"objective.num_steps={k}",
                f"parallel.defer_grad_sync={str(defer).lower()}",
                "metrics.log_every=2",
                "run.max_steps=100",
                f"run.output_dir={args.out}/k{k}-defer{int(defer)}",
            ]
            with Trainer(load_config(args.config, _overrides(args) + extra)) as trainer:
                trainer._one_step()
                with _counting(trainer) as logging_step:
                    trainer._one_step()
                with CollectiveCounter() as collectives, _counting(trainer) as plain_step:
                    trainer._one_step()
                units = len(trainer.spec.sharding_units(trainer.strategy.unwrapped())) + 1
            out["collectives"].append({"k": k, "defer": defer, "units": units, **collectives.counts})
            out["syncs"][k] = {
                name: {"counts": c.counts, "sites": sorted(set(c.sites))}
                for name, c in (("logging", logging_step), ("plain", plain_step))
            }
    return out


@contextlib.contextmanager
def _counting(trainer) -> Iterator[HostSyncCounter]:
    """A host-sync counter around trainer steps; on a CPU run it is told what the trainer moves to
    its device (weights, the batch, the noise: see `HostSyncCounter`)."""
    counter = HostSyncCounter(trainer.device, [*trainer.model.parameters(), *trainer.teacher.module.parameters()])
    next_batch, noise = trainer._next_batch, trainer._noise

    def marked_batch(loader):
        batch, lengths = next_batch(loader)
        counter.mark(batch)
        return batch, lengths

    def marked_noise(*args, **kwargs):
        out = noise(*args, **kwargs)
        counter.mark(out[0])
        return out

    trainer._next_batch, trainer._noise = marked_batch, marked_noise
    try:
        with counter:
            yield counter
    finally:
        del trainer._next_batch, trainer._noise


def _worker_main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    if args.worker == "counts":
        record = _counts_worker(args)
    else:
        times = (_bare_worker if args.worker == "bare" else _trainer_worker)(args)
        steady = times[args.warmup :]
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        record = {
            "mean_s": sum(steady) / len(steady),
            "median_s": sorted(steady)[len(steady) // 2],
            "steps": len(steady),
            "peak_rss_mib": peak_mib,
            "state_mib": getattr(args, "state_mib", None),
        }
    if int(os.environ.get("RANK", "0")) == 0:
        print("BENCH " + json.dumps(record), flush=True)
    shutdown_distributed()


def _free_port() -> int:
    """A port no one listens on now (other jobs on the machine may hold fixed ones)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(variant: str, ranks: int, args: argparse.Namespace, finetune: str = "full") -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "dopsd_scale.bench",
        "--worker",
        variant,
        "--model",
        args.model,
        "--data",
        args.data,
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--out",
        str(Path(args.out) / f"{variant}-{ranks}-{finetune}"),
        "--finetune",
        finetune,
        "--lora-rank",
        str(args.lora_rank),
        "--log-every",
        str(args.log_every),
        "--ks",
        *map(str, args.ks),
        "--set",
        *args.set,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"{variant} on {ranks} rank(s) failed:\n{out.stderr[-3000:]}")
    return json.loads(line[6:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="trainer vs bare-loop step time")
    parser.add_argument("--model", required=True, help="debug pipeline directory")
    parser.add_argument("--data", required=True, help="feature shards")
    parser.add_argument(
        "--config", default=str(Path(__file__).resolve().parents[1] / "launch/configs/debug_zimage.yaml")
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--lora", action="store_true", help="LoRA vs full D-OPSD in the trainer, one rank")
    parser.add_argument("--lora-rank", type=int, default=64, help="with --lora: the adapters' rank (alpha = 2 r)")
    parser.add_argument("--log-every", type=int, default=10, help="the trainer's metrics.log_every while timed")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating; the best is kept")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="roll-out steps K for the counts")
    parser.add_argument("--no-counts", action="store_true", help="skip the collective and host-read counts")
    parser.add_argument("--sync-k", type=int, default=4, help="K of the host-read counts")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for every run (key=value)")
    parser.add_argument("--worker", choices=("bare", "trainer", "counts"), help=argparse.SUPPRESS)
    parser.add_argument("--finetune", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args)
        return
    if args.lora:
        _lora_table(args)
        return
    _overhead_table(args)
    if not args.no_counts:
        _counts_tables(args)


def _overhead_table(args: argparse.Namespace) -> None:
    """trainer / bare per world size (`none` on one rank, FSDP2 on more), runs alternating, the best
    median step time of each kept (other jobs on a shared machine only ever slow a run down)."""
    print(
        f"trainer vs bare loop, same parallel strategy: median s/step after {args.warmup} warm-up steps, "
        f"best of {args.repeats} alternating runs, log_every {args.log_every}"
    )
    print(f"{'strategy':>8} | {'ranks':>5} | {'bare loop s/step':>16} | {'trainer s/step':>14} | {'trainer/bare':>12}")
    for ranks in args.ranks:
        best = {"bare": float("inf"), "trainer": float("inf")}
        for _ in range(args.repeats):
            for variant in best:
                best[variant] = min(best[variant], _launch(variant, ranks, args)["median_s"])
        strategy = "fsdp2" if ranks > 1 else "none"
        print(
            f"{strategy:>8} | {ranks:>5} | {best['bare']:>16.4f} | {best['trainer']:>14.4f} | "
            f"{best['trainer'] / best['bare']:>12.3f}"
        )


def _counts_tables(args: argparse.Namespace) -> None:
    """Gradient collectives per optimizer step (FSDP2, the largest world size) for each K with and
    without deferred sync, and host reads per step on one rank (`none`) and under FSDP2."""
    ranks = max(args.ranks)
    runs = {1: _launch("counts", 1, argparse.Namespace(**{**vars(args), "ks": [args.sync_k]}))}
    if ranks > 1:
        ks = sorted({*args.ks, args.sync_k})
        runs[ranks] = _launch("counts", ranks, argparse.Namespace(**{**vars(args), "ks": ks}))
        rows = {(r["k"], r["defer"]): r for r in runs[ranks]["collectives"]}
        units = runs[ranks]["collectives"][0]["units"]
        print(f"\ncollectives per optimizer step, FSDP2 on {ranks} ranks ({units} FSDP units), a non-logging step")
        print(
            f"{'K':>3} | {'reduce-scatter':>14} | {'deferred: reduce-scatter':>24} | {'all-gather':>10} | "
            f"{'deferred: all-gather':>20} | {'all-reduce':>10}"
        )
        for k in args.ks:
            plain, deferred = rows[(k, False)], rows[(k, True)]
            print(
                f"{k:>3} | {plain['reduce_scatter']:>14} | {deferred['reduce_scatter']:>24} | "
                f"{plain['all_gather']:>10} | {deferred['all_gather']:>20} | {plain['all_reduce']:>10}"
            )
    print(
        f"\nhost syncs per optimizer step (trainer, K={args.sync_k}): reads of device values (CPU run: values "
        "traced from the model, the moved batch and device factories); host reads: schedules, the batch "
        "before its transfer, AdamW's CPU step counts"
    )
    print(
        f"{'strategy':>8} | {'ranks':>5} | {'step':>11} | {'host syncs':>10} | {'host reads':>10} | sites of the syncs"
    )
    for n, rec in runs.items():
        for step in ("plain", "logging"):
            found = rec["syncs"][str(args.sync_k)][step]
            c, sites = found["counts"], [s[len("device: ") :] for s in found["sites"] if s.startswith("device")]
            print(
                f"{'fsdp2' if n > 1 else 'none':>8} | {n:>5} | {step:>11} | {c['device']:>10} | {c['host']:>10} | "
                f"{'; '.join(sites)}"
            )


def _lora_table(args: argparse.Namespace) -> None:
    rows = [(mode, _launch("trainer", 1, args, finetune=mode)) for mode in ("full", "lora")]
    full = rows[0][1]
    print(f"{'finetune':>8} | {'s/step':>8} | {'vs full':>7} | {'peak RSS MiB':>12} | {'train state MiB':>15}")
    for mode, r in rows:
        print(
            f"{mode:>8} | {r['mean_s']:>8.4f} | {r['mean_s'] / full['mean_s']:>7.3f} | {r['peak_rss_mib']:>12.0f} | "
            f"{r['state_mib']:>15.3f}"
        )


if __name__ == "__main__":
    main()
