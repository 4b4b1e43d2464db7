"""What a person looks at: the precheck verdict, and one self-contained HTML report for `eval`.

The HTML is a view of results.json (which holds every per-seed value): per prompt set, a table of
mean ± 95% half-width per metric and model (best mean in bold, the better direction beside the
name), an inline SVG bar chart per metric with its interval, and image grids, base and tuned models
side by side from the same noise (first seed), with the concept targets above. No JavaScript,
no fonts, no plotting library: it opens anywhere and mails as one file. The same grids are also
written as PNG files under `grids/`.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import torch
from PIL import Image

from ..stats import format_interval
from .generate import image_path, read_image
from .metrics import fit_square

PALETTE = ("#8c8c8c", "#3b6fb6", "#d9822b", "#3f9a5a", "#b04a9a", "#c23b3b", "#6b5bb6")
THUMB = 160


# ---- precheck ------------------------------------------------------------------------------------
def precheck_verdict(measure: dict, name: str) -> dict:
    """GOOD when the teacher's lead over the student is both significant (positive beyond its 95%
    interval) and large (at least 10% of the student's distance); WEAK when only one of the two
    holds; BAD when neither does: no measurable signal for D-OPSD to distil."""
    lead, half = measure["lead"]
    rel, wins, n = measure["relative_lead"], measure["teacher_closer"], measure["n"]
    significant, large = lead - half > 0, lead > 0 and rel >= 0.1
    numbers = (
        f"on {name}, the teacher's roll-out is {rel:+.1%} closer to the target than the student's "
        f"(lead {lead:.4g} ± {half:.4g}; teacher closer on {wins}/{n} samples)"
    )
    if significant and large:
        return {
            "label": "GOOD",
            "text": f"{numbers}: the teacher context carries the target, so D-OPSD has a signal to distil.",
        }
    if significant or large:
        return {
            "label": "WEAK",
            "text": f"{numbers}: the lead is {'small' if significant else 'uncertain'}; expect "
            "slow progress, check the teacher context or look at more samples "
            "(--samples).",
        }
    return {
        "label": "BAD",
        "text": f"{numbers}: no measurable lead, so training would have little to distil; "
        "check the teacher context and the feature cache before training.",
    }


def format_precheck(results: dict) -> str:
    """The verdict with its numbers, as printed by `dopsd precheck`."""
    lines = [
        f"precheck: {results['samples']} samples of {results['data']}, {results['steps']} steps, seed "
        f"{results['seed']}; distance to the target (lower = closer), mean ± 95% half-width",
        f"  {'measure':<16} {'student':>22} {'teacher':>22} {'teacher lead':>22} {'closer':>8}",
    ]
    for name, m in results["measures"].items():
        cells = [format_interval(*m[k], digits=4) for k in ("student", "teacher", "lead")]
        mark = " *" if name == results["primary"] else ""
        lines.append(
            f"  {name + mark:<16} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22} {m['teacher_closer']:>4}/{m['n']:<3}"
        )
    verdict = results["verdict"]
    lines += [
        f"verdict ({results['primary']}, marked *): {verdict['label']}: {verdict['text']}",
        f"grid (target | student | teacher per row): {results.get('grid', '')}",
    ]
    return "\n".join(lines)


# ---- eval: charts ------------------------------------------------------------------------------------
def bar_chart(title: str, models: list[str], means: list[float], halves: list, colours: list[str]) -> str:
    """An inline SVG bar chart with 95% error bars (none where the half-width is None)."""
    width, height, left, top, bottom = 60 + 70 * len(models), 190, 48, 26, 36
    plot_h = height - top - bottom
    ends = [m + s * (h or 0.0) for m, h in zip(means, halves) for s in (-1, 1)]
    lo, hi = min(0.0, *ends), max(0.0, *ends)
    hi = hi if hi > lo else lo + 1.0

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="10"><text x="{width / 2}" y="14" text-anchor="middle" font-size="12">'
        f"{html.escape(title)}</text>",
        f'<line x1="{left}" x2="{width - 8}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#444"/>',
        f'<text x="{left - 4}" y="{y(hi) + 4:.1f}" text-anchor="end">{hi:.3g}</text>',
        f'<text x="{left - 4}" y="{y(lo) + 4:.1f}" text-anchor="end">{lo:.3g}</text>',
    ]
    slot = (width - left - 8) / max(len(models), 1)
    for i, (name, m, h, colour) in enumerate(zip(models, means, halves, colours)):
        x = left + i * slot + slot * 0.2
        bar_w, cx = slot * 0.6, left + (i + 0.5) * slot
        parts.append(
            f'<rect x="{x:.1f}" y="{y(max(m, 0)):.1f}" width="{bar_w:.1f}" '
            f'height="{abs(y(m) - y(0)):.1f}" fill="{colour}"/>'
        )
        if h:
            y1, y2 = y(m - h), y(m + h)
            parts.append(
                f'<path d="M{cx:.1f} {y1:.1f}V{y2:.1f}M{cx - 5:.1f} {y1:.1f}h10M{cx - 5:.1f} {y2:.1f}h10" '
                'stroke="#000" fill="none"/>'
            )
        parts.append(f'<text x="{cx:.1f}" y="{height - 20}" text-anchor="middle">{html.escape(name[:12])}</text>')
        parts.append(f'<text x="{cx:.1f}" y="{height - 6}" text-anchor="middle" fill="#555">{m:.3g}</text>')
    return "".join(parts) + "</svg>"


# ---- eval: tables and grids ----------------------------------------------------------------------------
def _best(values: dict[str, float], better: str) -> str:
    if better == "closer to 0":
        return min(values, key=lambda k: abs(values[k]))
    return (max if better == "higher" else min)(values, key=values.get)


def metric_table(per_metric: dict, info: dict, models: list[str]) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    rows = []
    for key, per_model in per_metric.items():
        meta = info.get(key, {"better": "", "definition": ""})
        best = _best({m: s["mean"] for m, s in per_model.items()}, meta["better"]) if len(per_model) > 1 else None
        cells = []
        for m in models:
            s = per_model.get(m)
            text = (
                ""
                if s is None
                else (f"{s['mean']:.4g} ± {s['half']:.2g}" if s["half"] is not None else f"{s['mean']:.4g} (1 seed)")
            )
            cells.append(f"<td>{'<b>' + text + '</b>' if m == best else text}</td>")
        arrow = {"higher": "↑", "lower": "↓", "closer to 0": "→0"}.get(meta["better"], "")
        rows.append(
            f'<tr><th title="{html.escape(meta["definition"])}">{html.escape(key)} {arrow}</th>'
            f'{"".join(cells)}<td class="def">{html.escape(meta["definition"])}</td></tr>'
        )
    return f"<table><tr><th>metric</th>{head}<th>definition</th></tr>{''.join(rows)}</table>"


def _img_tag(image: torch.Tensor | Image.Image, title: str = "") -> str:
    if isinstance(image, torch.Tensor):
        arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        image = Image.fromarray(arr)
    image = image.copy()
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" title="{html.escape(title)}">'


def image_grid(results: dict, out: Path, set_name: str, limit: int) -> str:
    """HTML rows (prompt | one image per model, first seed) and the same grid as a PNG file."""
    from ..validation import images_to_grid

    seed, models = results["seeds"][0], list(results["models"])
    prompts = results["sets"][set_name][:limit]
    header = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    rows, tiles = [], []
    for i, prompt in enumerate(prompts):
        images = [read_image(image_path(out, m, set_name, seed, i, prompt)) for m in models]
        tiles += list(fit_square(images, min(THUMB, *(min(x.shape[-2:]) for x in images))))
        cells = "".join(f"<td>{_img_tag(x, m)}</td>" for x, m in zip(images, models))
        rows.append(f"<tr><td class='prompt'>{html.escape(prompt)}</td>{cells}</tr>")
    grid_dir = out / "grids"
    grid_dir.mkdir(parents=True, exist_ok=True)
    if tiles:
        size = min(min(t.shape[-2:]) for t in tiles)
        images_to_grid(fit_square(tiles, size), columns=len(models)).save(grid_dir / f"{set_name}_seed{seed}.png")
    return (
        f"<p>seed {seed}, same noise in every column; all images: <code>images/&lt;model&gt;/{set_name}/</code>; "
        f"this grid: <code>grids/{set_name}_seed{seed}.png</code></p>"
        f"<table class='grid'><tr><th>prompt</th>{header}</tr>{''.join(rows)}</table>"
    )


STYLE = """body{font-family:sans-serif;margin:24px;max-width:1400px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}td.def{color:#666;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:12px}.grid img{display:block}td.prompt{max-width:260px;font-size:13px}
.notes li{color:#444}"""


def write_report(results: dict, out: Path, grid_prompts: int = 8) -> Path:
    """`<out>/report.html` from the results (see the module docstring)."""
    out = Path(out)
    models = list(results["models"])
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(models))]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>dopsd eval</title><style>{STYLE}</style>"
        "</head><body><h1>dopsd eval</h1>",
        "<table><tr><th>model</th><th>path</th><th>checkpoint</th></tr>",
    ]
    for name, m in results["models"].items():
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(m['path'])}</td>"
            f"<td>{html.escape(m['checkpoint'] or '')}</td></tr>"
        )
    gen = results["generation"]
    parts.append(
        f"</table><p>seeds {results['seeds']}; images generated this run {gen['generated']}, "
        f"reused {gen['cached']}; numbers: <a href='results.json'>results.json</a></p>"
    )
    parts.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in results["notes"]) + "</ul>")
    for set_name, per_metric in results["metrics"].items():
        parts.append(f"<h2>{html.escape(set_name)} prompts ({len(results['sets'][set_name])})</h2>")
        parts.append(metric_table(per_metric, results["metric_info"], models))
        charts = []
        for key, per_model in per_metric.items():
            names = [m for m in models if m in per_model]
            charts.append(
                bar_chart(
                    key,
                    names,
                    [per_model[m]["mean"] for m in names],
                    [per_model[m]["half"] for m in names],
                    [colours[models.index(m)] for m in names],
                )
            )
        parts.append(f"<div class='charts'>{''.join(charts)}</div>")
        if set_name == "concept" and results.get("target_images"):
            thumbs = "".join(_img_tag(read_image(p), Path(p).name) for p in results["target_images"][:8])
            parts.append(f"<p>targets</p><div class='charts'>{thumbs}</div>")
        parts.append(image_grid(results, out, set_name, grid_prompts))
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
