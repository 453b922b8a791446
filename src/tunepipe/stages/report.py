"""Stage `report`: report/report.md and a self-contained report/report.html (plots inlined).

It reads only files of earlier stages: pipeline.json, env.json, config.resolved.yaml, data/stats.json
and rejects.jsonl, <stage>/log.jsonl, eval/metrics.json and eval/samples/. Sections: run summary
(config digest, hardware, versions, time per stage against the budget), warnings, the metrics table
(base vs SFT vs DPO with deltas), training curves, data, and sample generations side by side.
`compare_runs` puts several run folders in one report.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..redaction import redact_text
from ..training import read_log
from . import Gate, StageContext, StageResult

LOWER_IS_BETTER = {"loss", "perplexity"}
# Curves drawn for every training stage, when the trainer logged them; each stage adds its own
# (stages.registry: TrainingStage.curves).
COMMON_CURVES = [("loss", "loss"), ("learning_rate", "learning rate"), ("grad_norm", "grad norm")]


def curves_of(stage: str) -> list[tuple[str, str]]:
    from . import registry

    own = registry.get(stage).curves if registry.is_training_stage(stage) else ()
    return [*COMMON_CURVES, *((c.key, c.label) for c in own)]


def _models(metrics: dict[str, Any]) -> list[str]:
    """The models of metrics.json in the order eval wrote them (base first, then pipeline order)."""
    return sorted(metrics, key=lambda m: m != "base")


def _pipeline_of(config_text: str) -> list[str]:
    """The run's training stages in order, from its config.resolved.yaml (older runs: sft, dpo)."""
    import yaml

    try:
        raw = yaml.safe_load(config_text) if config_text else None
    except yaml.YAMLError:
        raw = None
    order = raw.get("pipeline") if isinstance(raw, dict) else None
    if not isinstance(order, list):
        order = ["sft", "dpo"]
    sections = raw if isinstance(raw, dict) else {}
    return [s for s in order if isinstance(s, str) and (sections.get(s) or {}).get("enabled") is not False]


SAMPLES_SHOWN = 6
REJECT_WARN = 0.05  # a source losing more than this share of its rows is worth a look
TRUNCATION_WARN = 0.10
SPIKE_FACTOR = 2.0  # a logged loss above this times the median of the previous window


# --------------------------------------------------------------------------- reading the run folder


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class RunData:
    run_dir: Path
    name: str
    pipeline: dict[str, Any]
    env: dict[str, Any]
    config_text: str
    metrics: dict[str, dict[str, dict[str, float]]]
    stats: dict[str, Any]
    logs: dict[str, list[dict[str, Any]]]
    stage_json: dict[str, dict[str, Any]]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)  # the trained stages, in pipeline order

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.config_text.encode()).hexdigest()[:12] if self.config_text else "—"

    def samples(self, model: str, set_name: str) -> list[dict[str, Any]]:
        return _read_jsonl(self.run_dir / "eval" / "samples" / f"{model}.{set_name}.jsonl")


def read_run(run_dir: Path) -> RunData:
    cfg_path = run_dir / "config.resolved.yaml"
    config_text = cfg_path.read_text() if cfg_path.is_file() else ""
    stages = _pipeline_of(config_text)
    return RunData(
        run_dir=run_dir,
        name=run_dir.name,
        pipeline=_read_json(run_dir / "pipeline.json"),
        env=_read_json(run_dir / "env.json"),
        config_text=config_text,
        metrics=_read_json(run_dir / "eval" / "metrics.json"),
        stats=_read_json(run_dir / "data" / "stats.json"),
        logs={s: read_log(run_dir / s / "log.jsonl") for s in stages},
        stage_json={s: _read_json(run_dir / s / "stage.json") for s in (*stages, "eval")},
        rejects=_read_jsonl(run_dir / "data" / "rejects.jsonl"),
        stages=stages,
    )


# --------------------------------------------------------------------------- tables


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return "—" if v is None else str(v)


def _worse(metric: str, before: float, after: float) -> bool:
    """Worse beyond noise: 0.01 absolute for scores, 2% relative for loss and perplexity."""
    if metric in LOWER_IS_BETTER:
        return after > before * 1.02
    return after < before - 0.01


def metrics_table(metrics: dict[str, dict[str, dict[str, float]]]) -> list[list[str]]:
    models = _models(metrics)
    header = ["set", "metric", *models]
    deltas = list(zip(models, models[1:], strict=False))  # each model against the one it started from
    header += [f"Δ {b}−{a}" for a, b in deltas]
    rows = [header]
    sets = list(dict.fromkeys(s for m in models for s in metrics[m]))
    for s in sets:
        names = list(dict.fromkeys(k for m in models for k in metrics[m].get(s, {}) if k != "n"))
        for k in names:
            vals = {m: metrics[m].get(s, {}).get(k) for m in models}
            label = k + (" ↓" if k in LOWER_IS_BETTER else "")
            row = [s, label, *(_fmt(vals[m]) for m in models)]
            for a, b in deltas:
                va, vb = vals[a], vals[b]
                if va is None or vb is None:
                    row.append("—")
                else:
                    row.append(f"{vb - va:+.4f}" + (" ⚠" if _worse(k, va, vb) else ""))
            rows.append(row)
    return rows


def _markdown(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def stage_time_table(run: RunData, cfg: Config | None) -> list[list[str]]:
    """Each stage's last run time against its planned share of hardware.time_limit."""
    stages = run.pipeline.get("stages", {})
    limit = cfg.hardware.time_limit_s if cfg else None
    active = [s for s, rec in stages.items() if rec.get("status") != "disabled"]
    rows = [["stage", "status", "time", "budget", "summary"]]
    used = 0.0
    for name, rec in stages.items():
        secs = rec.get("seconds")
        used += secs or 0.0
        budget = limit * cfg.hardware.share(name, active) if cfg and limit and name in active else None
        summary = (rec.get("summary") or rec.get("error") or "")[:140]
        status = rec.get("status", "?")
        if name == "report" and status == "running":
            status, summary = "this report", ""
        rows.append([name, status, _duration(secs), _duration(budget), summary])
    rows.append(["total", "", _duration(used), _duration(limit), "hardware.time_limit" if limit else ""])
    return rows


# --------------------------------------------------------------------------- warnings


def _loss_spikes(log: list[dict[str, Any]], window: int = 5) -> list[tuple[int, float, float]]:
    losses = [(r["step"], r["loss"]) for r in log if isinstance(r.get("loss"), int | float)]
    spikes = []
    for i in range(window, len(losses)):
        med = statistics.median(v for _, v in losses[i - window : i])
        step, v = losses[i]
        if med > 0 and v > SPIKE_FACTOR * med:
            spikes.append((step, med, v))
    return spikes


def warnings_for(run: RunData) -> list[str]:
    out = []
    for s in run.stats.get("sources", []):
        if s.get("rows_in") and s["rows_rejected"] / s["rows_in"] > REJECT_WARN:
            share = s["rows_rejected"] / s["rows_in"]
            out.append(
                f"high reject rate: {Path(s['file']).name} ({s['stage']}/{s['split']}) lost "
                f"{s['rows_rejected']} of {s['rows_in']} rows ({share:.0%}); reasons in data/rejects.jsonl"
            )
    length_rejects = sum("max_length" in str(r.get("reason", "")) for r in run.rejects)
    for name, st in run.stats.get("splits", {}).items():
        rows = st.get("rows") or 0
        if rows and st.get("truncated", 0) / rows > TRUNCATION_WARN:
            out.append(
                f"heavy truncation: {st['truncated']} of {rows} rows in {name} were cut to data.max_length; "
                "raise data.max_length or shorten the data"
            )
    total_in = sum(s.get("rows_in", 0) for s in run.stats.get("sources", []))
    if total_in and length_rejects / total_in > TRUNCATION_WARN:
        out.append(
            f"heavy truncation: {length_rejects} of {total_in} rows were longer than data.max_length and "
            "dropped (data.truncation: drop); raise data.max_length"
        )
    for stage, log in run.logs.items():
        for step, med, v in _loss_spikes(log)[:3]:
            out.append(f"loss spike in {stage} at step {step}: {v:.3g} against a recent median of {med:.3g}")
    for rec_name, rec in run.pipeline.get("stages", {}).items():
        if rec.get("status") in ("failed", "stopped", "stale"):
            why = f": {rec['error']}" if rec.get("error") else ""
            out.append(f"stage {rec_name} is {rec['status']}{why}")
    m = run.metrics
    order = _models(m)
    for a, b in zip(order, order[1:], strict=False):
        for s, vals in m[b].items():
            for k, vb in vals.items():
                va = m[a].get(s, {}).get(k)
                if k != "n" and va is not None and _worse(k, va, vb):
                    out.append(f"{k} on {s} got worse from {a} to {b}: {va:.4g} → {vb:.4g}")
    return out


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(log: list[dict[str, Any]], stage: str, dest: Path) -> bool:
    from . import registry

    curves = [(k, t) for k, t in curves_of(stage) if any(isinstance(r.get(k), int | float) for r in log)]
    if not curves:
        return False
    plt = _pyplot()
    cols = min(3, len(curves))
    nrows = -(-len(curves) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), dpi=100, squeeze=False)
    for ax, (key, title) in zip(axes.flat, curves, strict=False):
        pts = [(r["step"], r[key]) for r in log if isinstance(r.get(key), int | float)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1.2, color="#1f77b4")
        ax.set(xlabel="step", title=f"{registry.title(stage)} {title}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)
    return True


def plot_lengths(stats: dict[str, Any], dest: Path) -> bool:
    hists = {n: s["histogram"] for n, s in stats.get("splits", {}).items() if s.get("histogram")}
    train = {n: h for n, h in hists.items() if n.endswith("_train")} or hists
    if not train:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(train), figsize=(4.2 * len(train), 2.8), dpi=100, squeeze=False)
    for ax, (name, h) in zip(axes.flat, train.items(), strict=True):
        edges, counts = h["edges"], h["counts"]
        widths = [b - a for a, b in zip(edges, edges[1:], strict=False)]
        ax.bar(edges[:-1], counts, width=widths, align="edge")
        ax.set(xlabel="tokens per example", ylabel="examples", title=f"{name} lengths")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- sections


def _summary_md(run: RunData, cfg: Config | None, smoke: bool) -> list[str]:
    env, pkgs = run.env, run.env.get("packages", {})
    hw = (
        f"{len(env['gpus'])}× {env['gpus'][0]}"
        if env.get("gpus")
        else f"CPU ({env.get('cpu_count', '?')} cores, bf16 {'yes' if env.get('cpu_bf16') else 'no'})"
    )
    lines = ["## Run summary", ""]
    if cfg and cfg.project.goal:
        lines += [f"Goal: {cfg.project.goal}", ""]
    lines += [
        f"- base model: `{cfg.model.name_or_path if cfg else '?'}`" + ("  (smoke run)" if smoke else ""),
        f"- config digest: `{run.digest}` (sha256 of config.resolved.yaml)",
        f"- hardware: {hw}; Python {env.get('python', '?')}; {env.get('platform', '')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in pkgs.items() if v),
        "",
        "Time per stage (last run) against the planned share of `hardware.time_limit`:",
        "",
        _markdown(stage_time_table(run, cfg)),
        "",
    ]
    return lines


def _data_md(run: RunData) -> list[str]:
    sources = run.stats.get("sources", [])
    if not sources:
        return []
    lines = [
        "## Data",
        "",
        "| stage | split | file | format | in | accepted | rejected |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['stage']} | {s['split']} | {Path(s['file']).name} | {s['format']} | {s['rows_in']} | "
        f"{s['rows_accepted']} | {s['rows_rejected']} |"
        for s in sources
    ]
    lines += ["", "| split | rows | tokens | mean | p95 | max | truncated |", "|---|---|---|---|---|---|---|"]
    for name, st in run.stats.get("splits", {}).items():
        if st.get("rows"):
            lines.append(
                f"| {name} | {st['rows']} | {st['tokens']} | {st['mean']} | {st['p95']} | {st['max']} | "
                f"{st.get('truncated', 0)} |"
            )
    if run.rejects:
        reasons = Counter(re.sub(r"\d+", "N", str(r.get("reason", "")))[:100] for r in run.rejects)
        lines += ["", "Most common reject reasons:", ""]
        lines += [f"- {n} × {reason}" for reason, n in reasons.most_common(5)]
    lines.append("")
    return lines


def sample_tables(run: RunData, n: int = SAMPLES_SHOWN) -> dict[str, list[list[str]]]:
    """Per conversation set: prompt, reference and each model's output (✓ when its first score is 1)."""
    models = _models(run.metrics)
    sets = list(dict.fromkeys(s for m in models for s in run.metrics[m]))
    tables = {}
    for s in sets:
        per_model = {m: run.samples(m, s) for m in models}
        first = next((v for v in per_model.values() if v), [])
        if not first or "output" not in first[0]:
            continue
        rows = [["prompt", "reference", *models]]
        for i in range(min(n, len(first))):
            row = [first[i]["prompt"], first[i]["reference"]]
            for m in models:
                ex = per_model[m][i] if i < len(per_model[m]) else None
                if ex is None:
                    row.append("—")
                    continue
                scores = list(ex.get("score", {}).values())
                mark = (" ✓" if scores[0] >= 1 else " ✗") if scores else ""
                row.append((ex["output"] or "∅") + mark)
            rows.append(row)
        tables[s] = rows
    return tables


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2733;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #dde3ea;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:14px}
th{background:#2f5d8a;color:#fff;font-weight:600}
td,th{border:1px solid #c9d2dc;padding:4px 9px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.worse{background:#fde2e1}td.better{background:#e3f4e1}
.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:.5em 1em;margin:.6em 0}
.warn li{margin:.2em 0}img{max-width:100%;border:1px solid #e3e7ec;margin:.4em 0}
code{background:#f1f3f5;padding:1px 4px;border-radius:3px}
"""


def _cell_class(text: str) -> str:
    if text.startswith(("+", "-")) and text[1:2].isdigit():
        return "num worse" if "⚠" in text else "num"
    return "num" if re.fullmatch(r"-?[\d.]+|—", text) else ""


def _html_table(rows: list[list[str]], delta_cols: bool = False) -> str:
    if not rows:
        return ""
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in rows[0]) + "</tr>"]
    for r in rows[1:]:
        cells = []
        for c in r:
            cls = _cell_class(c) if delta_cols else ("num" if re.fullmatch(r"-?[\d.]+", c) else "")
            cells.append(f"<td class='{cls}'>{html.escape(c)}</td>" if cls else f"<td>{html.escape(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<p><img alt='{html.escape(path.name)}' src='data:image/png;base64,{data}'></p>"


def _html_page(title: str, blocks: list[str]) -> str:
    return "\n".join(
        [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            *blocks,
            "</body></html>",
        ]
    )


def _md_to_html_lines(lines: list[str]) -> str:
    """The few markdown shapes the summary and data sections use: paragraphs, bullets, tables."""
    out: list[str] = []
    table: list[list[str]] = []
    bullets: list[str] = []

    def flush() -> None:
        if table:
            out.append(_html_table(table))
            table.clear()
        if bullets:
            out.append("<ul>" + "".join(f"<li>{b}</li>" for b in bullets) + "</ul>")
            bullets.clear()

    for line in "\n".join(lines).splitlines():  # a table arrives as one multi-line element
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
            if not all(set(c) <= {"-", "|"} for c in cells):
                table.append(cells)
            continue
        if line.startswith("- "):
            bullets.append(_inline(line[2:]))
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


# --------------------------------------------------------------------------- the stage


def write_report(run: RunData, cfg: Config | None, out: Path, smoke: bool = False) -> dict[str, Any]:
    """report.md, report.html and the PNGs for one run folder; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.project.name if cfg else run.name
    title = (cfg.report.title if cfg else None) or f"{name}: fine-tuning report"
    plots_on = cfg.report.plots if cfg else True
    summary = _summary_md(run, cfg, smoke)
    warnings = warnings_for(run)
    table = metrics_table(run.metrics) if run.metrics else []
    curve_pngs = []
    for stage in run.stages:
        if plots_on and plot_curves(run.logs.get(stage, []), stage, out / f"{stage}_curves.png"):
            curve_pngs.append(out / f"{stage}_curves.png")
    length_png = out / "lengths.png"
    has_lengths = plots_on and plot_lengths(run.stats, length_png)
    data = _data_md(run)
    samples = sample_tables(run)

    md = [f"# {title}", "", *summary, "## Warnings", ""]
    md += [f"- {w}" for w in warnings] if warnings else ["None."]
    md += ["", "## Metrics", ""]
    md += [_markdown(table) if table else "_no metrics: the eval stage has not run_", ""]
    md += [
        "Higher is better except where marked ↓ (loss, perplexity). Δ columns: the later model minus the "
        "earlier one; ⚠ marks a metric that got worse.",
        "",
        "## Training",
        "",
    ]
    for stage in run.stages:
        sj = run.stage_json.get(stage)
        if sj:
            md.append(f"- **{stage}**: {sj.get('summary', '')} ({sj.get('seconds', '?')} s)")
    md.append("")
    md += [f"![{p.name}]({p.name})" for p in curve_pngs] + [""]
    md += data
    if has_lengths:
        md += ["![lengths.png](lengths.png)", ""]
    if samples:
        md += ["## Sample generations", ""]
        for s, rows in samples.items():
            md += [f"### {s}", "", _markdown(rows), ""]
    (out / "report.md").write_text(redact_text("\n".join(md)), encoding="utf-8")

    blocks = [_md_to_html_lines(summary), "<h2>Warnings</h2>"]
    blocks.append(
        "<div class='warn'><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul></div>"
        if warnings
        else "<p>None.</p>"
    )
    blocks += ["<h2 id='metrics'>Metrics</h2>", _html_table(table, delta_cols=True) or "<p>No metrics.</p>"]
    blocks.append(
        "<p>Higher is better except where marked ↓. Δ: the later model minus the earlier one; "
        "red cells got worse.</p>"
    )
    blocks.append("<h2>Training</h2>")
    blocks += [_img(p) for p in curve_pngs]
    if data:
        blocks.append(_md_to_html_lines(data))
    if has_lengths:
        blocks.append(_img(length_png))
    if samples:
        blocks.append("<h2>Sample generations</h2>")
        for s, rows in samples.items():
            blocks += [f"<h3>{html.escape(s)}</h3>", _html_table(rows)]
    (out / "report.html").write_text(redact_text(_html_page(title, blocks)), encoding="utf-8")
    plots = [p.name for p in curve_pngs] + (["lengths.png"] if has_lengths else [])
    return {"plots": plots, "warnings": warnings}


def run(ctx: StageContext) -> StageResult:
    out = ctx.stage_dir("report")
    written = write_report(read_run(ctx.run_dir), ctx.cfg, out, ctx.smoke)
    ok = (out / "report.md").is_file() and (out / "report.html").is_file()
    return StageResult(
        summary=f"report/report.html ({len(written['plots'])} plots, {len(written['warnings'])} warnings)",
        gates=[Gate("report_written", ok, "report/report.md, report/report.html")],
        outputs={"report": "report/report.md", "html": "report/report.html", "plots": written["plots"]},
    )


# --------------------------------------------------------------------------- several runs


def compare_runs(run_dirs: list[Path], out: Path) -> Path:
    """One report over several run folders: the summary and every metric side by side."""
    runs = [read_run(d) for d in run_dirs]
    for r in runs:
        if not r.pipeline:
            raise FileNotFoundError(f"{r.run_dir}: not a tunepipe run folder (no pipeline.json)")
    names = _unique_names(runs)
    out.mkdir(parents=True, exist_ok=True)
    summary = [["run", "folder", "config digest", "status", "time"]]
    for n, r in zip(names, runs, strict=True):
        stages = r.pipeline.get("stages", {})
        status = ", ".join(f"{s}:{v.get('status', '?')}" for s, v in stages.items())
        secs = sum(v.get("seconds") or 0 for v in stages.values())
        summary.append([n, str(r.run_dir), r.digest, status, _duration(secs)])
    keys = list(
        dict.fromkeys(
            (m, s, k)
            for r in runs
            for m in _models(r.metrics)
            for s, vals in r.metrics.get(m, {}).items()
            for k in vals
            if k != "n"
        )
    )
    table = [["model", "set", "metric", *names]]
    for m, s, k in keys:
        vals = [r.metrics.get(m, {}).get(s, {}).get(k) for r in runs]
        table.append([m, s, k + (" ↓" if k in LOWER_IS_BETTER else ""), *(_fmt(v) for v in vals)])
    diff = _config_diff(runs, names)
    md = ["# Run comparison", "", _markdown(summary), "", "## Metrics", "", _markdown(table), ""]
    if diff:
        md += ["## Config differences", "", _markdown(diff), ""]
    (out / "compare.md").write_text(redact_text("\n".join(md)), encoding="utf-8")
    blocks = [_html_table(summary), "<h2 id='metrics'>Metrics</h2>", _html_table(table)]
    if diff:
        blocks += ["<h2>Config differences</h2>", _html_table(diff)]
    for n, r in zip(names, runs, strict=True):
        for stage in r.stages:
            png = out / f"{n}_{stage}_curves.png"
            if plot_curves(r.logs.get(stage, []), stage, png):
                blocks += [f"<h3>{html.escape(n)}: {stage}</h3>", _img(png)]
    page = out / "compare.html"
    page.write_text(redact_text(_html_page("Run comparison", blocks)), encoding="utf-8")
    return page


def _unique_names(runs: list[RunData]) -> list[str]:
    names = [r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _config_diff(runs: list[RunData], names: list[str]) -> list[list[str]]:
    import yaml

    flat = [_flatten(yaml.safe_load(r.config_text) or {}) for r in runs]
    keys = sorted({k for f in flat for k in f})
    rows = [["key", *names]]
    for k in keys:
        vals = [json.dumps(f.get(k), default=str) for f in flat]
        if len(set(vals)) > 1:
            rows.append([k, *vals])
    return rows if len(rows) > 1 else []
