"""`dopsd toyworld ...`: the toy world's data, experiment and before/after comparison."""

from __future__ import annotations

import argparse
from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _sweep(items: list[str]) -> dict[str, list[str]]:
    """['teacher.ema_decay=0.99,0.999', ...] -> {'teacher.ema_decay': ['0.99', '0.999']}."""
    out = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise argparse.ArgumentTypeError(f"--sweep {item!r}: expected key=v1,v2,...")
        out[key] = [v for v in values.split(",") if v]
    return out


def cmd_make_data(args: argparse.Namespace) -> None:
    from .experiment import BASE, make_concept_data

    print(make_concept_data(Path(args.out), Path(args.base or BASE)))


def cmd_experiment(args: argparse.Namespace) -> None:
    from .experiment import BASE, run_experiment

    results = run_experiment(
        Path(args.out),
        args.methods.split(","),
        _ints(args.seeds),
        args.steps,
        args.eval_every,
        _sweep(args.sweep),
        Path(args.base or BASE),
    )
    print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    print(f"{len(results['rows'])} evaluations in {results['seconds']} s; curves: {Path(args.out) / 'curves.png'}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .experiment import BASE, compare

    compare([Path(p) for p in args.tuned], Path(args.out), _ints(args.seeds), Path(args.base or BASE))


def add_toyworld_subcommands(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("toyworld", help="the toy world: a tiny few-step base that D-OPSD teaches a new concept")
    tsub = group.add_subparsers(dest="toy_command", required=True)
    p = tsub.add_parser("make-data", help="8 images of the new concept -> image shards -> feature shards")
    p.add_argument("--out", required=True)
    p.add_argument("--base", help="toy model directory (default: the shipped base)")
    p.set_defaults(fn=cmd_make_data)
    p = tsub.add_parser("experiment", help="train every method x seed with `dopsd train`, evaluate, tabulate")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--methods",
        default="dopsd,sft,live",
        help="comma list of dopsd, sft, live, dopsd+anchor, sft+anchor, dopsd-lora",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--sweep", action="append", help="key=v1,v2 (repeatable), e.g. teacher.ema_decay=0.99,0.999")
    p.add_argument("--base", help="toy model directory (default: the shipped base)")
    p.set_defaults(fn=cmd_experiment)
    p = tsub.add_parser("compare", help="base vs tuned: headline metrics over seeds and before/after grids")
    p.add_argument("--tuned", action="append", required=True, help="tuned toy model directory (e.g. a run's export)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--base", help="toy model directory (default: the shipped base)")
    p.set_defaults(fn=cmd_compare)
