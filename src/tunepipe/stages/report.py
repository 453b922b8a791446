"""Stage `report`: report/report.md and report/report.html with the metrics table (base / SFT / DPO
and the deltas) and the training-loss plots as PNG. Reads only files of earlier stages.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from ..training import read_log
from . import Gate, StageContext, StageResult

# Higher is better for these; for loss lower is better (the delta sign is shown as is).
MODELS = ("base", "sft", "dpo")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("—" if v is None else str(v))


def metrics_table(metrics: dict[str, dict[str, dict[str, float]]]) -> list[list[str]]:
    models = [m for m in MODELS if m in metrics]
    header = ["set", "metric", *models]
    deltas = [(b, a) for a, b in (("base", "sft"), ("sft", "dpo")) if a in models and b in models]
    header += [f"Δ {b}−{a}" for b, a in deltas]
    rows = [header]
    sets = sorted({s for m in models for s in metrics[m]})
    for s in sets:
        names = sorted({k for m in models for k in metrics[m].get(s, {}) if k != "n"})
        for k in names:
            vals = {m: metrics[m].get(s, {}).get(k) for m in models}
            row = [s, k, *(_fmt(vals[m]) for m in models)]
            for b, a in deltas:
                va, vb = vals[a], vals[b]
                row.append(f"{vb - va:+.4f}" if va is not None and vb is not None else "—")
            rows.append(row)
    return rows


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _plot_loss(log_rows: list[dict[str, Any]], title: str, dest: Path) -> bool:
    if not log_rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot([r["step"] for r in log_rows], [r["loss"] for r in log_rows], marker=".", lw=1.2)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)
    return True


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run(ctx: StageContext) -> StageResult:
    out = ctx.stage_dir("report")
    metrics = _read_json(ctx.run_dir / "eval" / "metrics.json")
    stats = _read_json(ctx.data_dir / "stats.json")
    title = ctx.cfg.report.title or f"{ctx.cfg.project.name}: fine-tuning report"
    md = [f"# {title}", ""]
    if ctx.cfg.project.goal:
        md += [f"Goal: {ctx.cfg.project.goal}", ""]
    md += [
        f"Base model: `{ctx.cfg.model.name_or_path}`"
        + ("  (smoke run: tiny subset, few steps)" if ctx.smoke else ""),
        "",
    ]
    table = metrics_table(metrics) if metrics else []
    md += ["## Metrics", "", _markdown(table) if table else "_no metrics: the eval stage has not run_", ""]
    md += [
        "exact_match and preference_accuracy: higher is better; loss (per assistant token): lower is better.",
        "",
    ]

    md += ["## Training", ""]
    plots = []
    for stage in ("sft", "dpo"):
        stage_json = _read_json(ctx.run_dir / stage / "stage.json")
        if stage_json:
            md.append(f"- **{stage}**: {stage_json.get('summary', '')} ({stage_json.get('seconds', '?')} s)")
        if ctx.cfg.report.plots and _plot_loss(
            read_log(ctx.run_dir / stage / "log.jsonl"),
            f"{stage.upper()} training loss",
            out / f"{stage}_loss.png",
        ):
            plots.append(f"{stage}_loss.png")
    md.append("")
    md += [f"![{p}]({p})" for p in plots] + [""]

    if stats:
        md += [
            "## Data",
            "",
            "| stage | split | file | format | in | accepted | rejected |",
            "|---|---|---|---|---|---|---|",
        ]
        md += [
            f"| {s['stage']} | {s['split']} | {Path(s['file']).name} | {s['format']} | {s['rows_in']} | "
            f"{s['rows_accepted']} | {s['rows_rejected']} |"
            for s in stats.get("sources", [])
        ]
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(title, table, out, plots, "\n".join(md)))
    return StageResult(
        summary=f"report/report.md ({len(plots)} plots)",
        gates=[Gate("report_written", (out / "report.md").is_file(), "report/report.md")],
        outputs={"report": "report/report.md", "html": "report/report.html", "plots": plots},
    )


def _html(title: str, table: list[list[str]], out: Path, plots: list[str], md: str) -> str:
    """A self-contained page: the table and the plots inlined, so it can be mailed or attached."""
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,td:nth-child(2){text-align:left}</style>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if table:
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table[0]) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table[1:]]
        parts.append("</table>")
    for p in plots:
        data = base64.b64encode((out / p).read_bytes()).decode()
        parts.append(f"<p><img alt='{p}' src='data:image/png;base64,{data}'></p>")
    parts.append(f"<details><summary>report.md</summary><pre>{html.escape(md)}</pre></details>")
    return "\n".join(parts)
