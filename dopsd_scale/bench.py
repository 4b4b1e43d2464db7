"""Benchmark: our Trainer's step time beside a bare hand-written loop doing the same D-OPSD math.

    python -m dopsd_scale.bench --model runs/assets/zimage --data runs/features --ranks 1 2

For each world size it launches both variants under torchrun (CPU, gloo), times the optimizer
steps after a warm-up, and prints one table with the ratio trainer / bare. The bare loop has the
same model, batch, roll-out, per-step backward, AdamW, clipping and EMA teacher, with gradients
averaged by a plain all-reduce, and none of the trainer's machinery (strategies, metrics,
checkpoints, data-state tracking). Timings are for reading by people, never for tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .distributed import shutdown_distributed


def _bare_worker(args: argparse.Namespace) -> list[float]:
    """The D-OPSD step written out by hand."""
    from .data.reader import build_loader
    from .flow import schedule
    from .models import get_spec

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    spec = get_spec("zimage", args.model)
    model = spec.load_transformer().train()
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
    loader = build_loader(args.data, args.batch_size, model.config.cap_feat_dim, rank=rank, world_size=world)
    sigmas = schedule(spec.train_sigmas(4))
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = next(loader)
        opt.zero_grad(set_to_none=True)
        x = torch.randn(len(batch), *spec.latent_shape(*batch.bucket))
        for k in range(4):
            s = torch.full((len(batch),), float(sigmas[k]))
            with torch.no_grad():
                v_t = spec.velocity(teacher, x, s, batch.teacher)
            v_s = spec.velocity(model, x, s, batch.student)
            (float(sigmas[k]) ** 2 * torch.mean((v_s - v_t) ** 2) / 4).backward()
            x = (x + (sigmas[k + 1] - sigmas[k]) * v_s.detach()).float()
        if world > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(teacher.parameters()), list(model.parameters()), 1e-4)
        times.append(time.perf_counter() - t0)
    return times


def _trainer_worker(args: argparse.Namespace) -> list[float]:
    from .config import load_config
    from .trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = [f"model.path={args.model}", f"data.path={args.data}", f"run.output_dir={args.out}",
                 f"data.batch_size={args.batch_size}", f"run.max_steps={args.steps}", "metrics.val_every=-1",
                 "metrics.tensorboard=false", "checkpoint.save_final=false", "checkpoint.export_final=false",
                 "checkpoint.resume=none", "metrics.log_every=1000000", "model.attention_backend=sdpa",
                 f"parallel.kind={'fsdp2' if world > 1 else 'none'}", "optim.lr=1e-4", "teacher.ema_decay=0.9999"]
    times = []
    with Trainer(load_config(args.config, overrides)) as trainer:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            trainer.train_step(next(trainer.loader).to(trainer.device))
            trainer.step += 1
            times.append(time.perf_counter() - t0)
    return times


def _worker_main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    times = (_bare_worker if args.worker == "bare" else _trainer_worker)(args)
    if int(os.environ.get("RANK", "0")) == 0:
        steady = times[args.warmup:]
        print("BENCH " + json.dumps({"mean_s": sum(steady) / len(steady), "steps": len(steady)}), flush=True)
    shutdown_distributed()


def _launch(variant: str, ranks: int, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
           f"--master_port={29600 + ranks * 7 + (variant == 'bare')}", "-m", "dopsd_scale.bench",
           "--worker", variant, "--model", args.model, "--data", args.data, "--config", args.config,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--out", str(Path(args.out) / f"{variant}-{ranks}")]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"{variant} on {ranks} rank(s) failed:\n{out.stderr[-3000:]}")
    return json.loads(line[6:])["mean_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="trainer vs bare-loop step time")
    parser.add_argument("--model", required=True, help="debug pipeline directory")
    parser.add_argument("--data", required=True, help="feature shards")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "launch/configs/debug_zimage.yaml"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--worker", choices=("bare", "trainer"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args)
        return
    rows = []
    for ranks in args.ranks:
        bare, ours = _launch("bare", ranks, args), _launch("trainer", ranks, args)
        rows.append((ranks, bare, ours))
    print(f"{'ranks':>5} | {'bare loop s/step':>16} | {'trainer s/step':>14} | {'trainer/bare':>12}")
    for ranks, bare, ours in rows:
        print(f"{ranks:>5} | {bare:>16.4f} | {ours:>14.4f} | {ours / bare:>12.3f}")


if __name__ == "__main__":
    main()
