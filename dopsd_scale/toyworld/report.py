"""Tables, curves and before/after grids of toy-world results (for people, never pass/fail).

`write_report(results, out)` turns the experiment's rows (one per run, checkpoint and seed) into
`table.md` (mean ± 95% interval over seeds, at every evaluated step) and `curves.png` (each
metric against training steps, one line per method, the interval as a band). `before_after`
draws base and tuned side by side from the same noise, prompt by prompt.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..stats import format_interval, t_interval

COLUMNS = {
    "concept_shape": "new concept (shape acc.)",
    "old_shape": "old prompts (shape acc.)",
    "old_all": "old prompts (all attributes)",
    "old_frechet": "Frechet dist. (old)",
    "old_sharpness": "sharpness (old)",
    "old_palette": "palette dist. (old)",
}


def group_rows(rows: list[dict]) -> dict[tuple[str, int], dict[str, list[float]]]:
    """(label, step) -> metric -> values over seeds; the base appears at step 0 of every label."""
    groups: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for key in COLUMNS:
            if key in row:
                groups[(row["label"], row["step"])][key].append(row[key])
    return groups


def format_table(rows: list[dict], steps: Sequence[int] | None = None, real: dict | None = None) -> str:
    groups = group_rows(rows)
    header = "| run | step | seeds | " + " | ".join(COLUMNS.values()) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    order = sorted(groups, key=lambda k: (k[0] != "base", k[0], k[1]))
    for label, step in order:
        if steps is not None and step not in steps and label != "base":
            continue
        metrics = groups[(label, step)]
        n = len(next(iter(metrics.values())))
        cells = [format_interval(*t_interval(metrics[k])) if k in metrics else "-" for k in COLUMNS]
        lines.append(f"| {label} | {step} | {n} | " + " | ".join(cells) + " |")
    if real:
        cells = [f"{real[k]:.3f}" if k in real else "-" for k in COLUMNS]
        lines.append("| real renders | - | - | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(rows)
    labels = sorted({label for label, _ in groups if label != "base"})
    base = {k: t_interval(v)[0] for k, v in groups.get(("base", 0), {}).items()}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, COLUMNS.items()):
        for label in labels:
            steps = sorted(step for lab, step in groups if lab == label and key in groups[(lab, step)])
            stats = [t_interval(groups[(label, s)][key]) for s in steps]
            xs = [0, *steps] if key in base else steps
            means = ([base[key]] if key in base else []) + [m for m, _ in stats]
            halves = ([0.0] if key in base else []) + [h for _, h in stats]
            ax.plot(xs, means, marker="o", label=label)
            ax.fill_between(
                xs, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)], alpha=0.2
            )
        if key in base:
            ax.axhline(base[key], color="gray", linestyle="--", linewidth=1, label="base")
        ax.set_title(title)
        ax.set_xlabel("training step")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(results: dict, out: Path) -> None:
    rows = results["rows"]
    final = max((r["step"] for r in rows), default=0)
    text = [
        "# Toy-world comparison\n",
        f"Settings of the latest call (earlier calls' runs are in the tables too): {results.get('settings', {})}\n",
        "\n## Final step\n",
        format_table(rows, steps=[final], real=results.get("real")),
        "\n## Every evaluated step\n",
        format_table(rows, real=results.get("real")),
    ]
    (out / "table.md").write_text("".join(text), encoding="utf-8")
    plot_curves(rows, out / "curves.png")


def upscale_grid(columns: Sequence[torch.Tensor], scale: int = 4, gap: int = 2) -> Image.Image:
    """Images [N, 3, h, w] in [-1, 1] per column -> one picture, rows = prompts, nearest upscaling."""
    from .world import to_uint8

    n, h, w = columns[0].shape[0], columns[0].shape[2] * scale, columns[0].shape[3] * scale
    grid = Image.new("RGB", (len(columns) * (w + gap), n * (h + gap)), (255, 255, 255))
    for c, images in enumerate(columns):
        for r, arr in enumerate(to_uint8(images)):
            tile = Image.fromarray(arr).resize((w, h), Image.NEAREST)
            grid.paste(tile, (c * (w + gap), r * (h + gap)))
    return grid
