"""The report from a run folder's files: sections, warnings, deltas, self-contained HTML, comparison,
and the page as headless Chromium renders it.

The run folders here are written by hand in the shapes the earlier stages write (the report reads
only files); tests/test_pipeline.py checks the report of a real run end to end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import tunepipe

from tunepipe.stages.report import compare_runs, metrics_table, read_run, write_report

METRICS = {
    "base": {
        "skills": {"exact_match": 0.0, "loss": 2.5, "n": 8},
        "prefs": {"preference_accuracy": 0.25, "n": 8},
    },
    "sft": {
        "skills": {"exact_match": 0.5, "loss": 0.9, "n": 8},
        "prefs": {"preference_accuracy": 0.5, "n": 8},
    },
    # DPO loses exact match: the report must flag it.
    "dpo": {
        "skills": {"exact_match": 0.375, "loss": 0.95, "n": 8},
        "prefs": {"preference_accuracy": 0.875, "n": 8},
    },
}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(run: Path, lr: float = 2e-3, metrics: dict | None = None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    cfg = {
        "project": {"name": "demo", "goal": "test the report"},
        "hardware": {"time_limit": "1h"},
        "sft": {"learning_rate": lr},
    }
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    stages = {
        "data": {"status": "done", "seconds": 12.0, "summary": "sft_train 30 rows"},
        "sft": {"status": "done", "seconds": 300.0, "summary": "20 steps"},
        "dpo": {"status": "done", "seconds": 200.0, "summary": "16 steps"},
        "eval": {"status": "done", "seconds": 80.0, "summary": "metrics"},
    }
    (run / "pipeline.json").write_text(json.dumps({"stages": stages}))
    (run / "env.json").write_text(
        json.dumps(
            {"python": "3.11.7", "cpu_count": 2, "gpus": [], "packages": {"torch": "2.13.0", "trl": "1.16"}}
        )
    )
    hist = {"edges": [10, 20, 30, 40], "counts": [5, 20, 5]}
    stats = {
        "sources": [
            {
                "stage": "sft",
                "split": "train",
                "file": "/d/train.jsonl",
                "format": "messages",
                "rows_in": 40,
                "rows_accepted": 30,
                "rows_rejected": 10,
            },
        ],
        "splits": {
            "sft_train": {
                "rows": 30,
                "tokens": 750,
                "mean": 25.0,
                "p50": 25,
                "p95": 35,
                "max": 39,
                "truncated": 6,
                "histogram": hist,
            },
        },
    }
    _jsonl(
        run / "data" / "rejects.jsonl", [{"file": "/d/train.jsonl", "line": 3, "reason": "messages: missing"}]
    )
    (run / "data" / "stats.json").write_text(json.dumps(stats))
    sft_log = [
        {"step": i, "loss": 2.0 - 0.05 * i, "learning_rate": lr, "grad_norm": 1.0} for i in range(1, 13)
    ]
    sft_log[9]["loss"] = 9.0  # a spike at step 10
    _jsonl(run / "sft" / "log.jsonl", sft_log)
    _jsonl(
        run / "dpo" / "log.jsonl",
        [
            {
                "step": i,
                "loss": 0.69 - 0.02 * i,
                "learning_rate": 5e-4,
                "grad_norm": 2.0,
                "rewards/accuracies": 0.5 + 0.03 * i,
                "rewards/margins": 0.1 * i,
            }
            for i in range(1, 9)
        ],
    )
    metrics = metrics or METRICS
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    for model in metrics:
        _jsonl(
            run / "eval" / "samples" / f"{model}.skills.jsonl",
            [
                {
                    "prompt": "What is 2 + 2?",
                    "reference": "4",
                    "output": "4" if model != "base" else "four",
                    "score": {"exact_match": float(model != "base")},
                },
                {
                    "prompt": "Sort: 3, 1",
                    "reference": "1, 3",
                    "output": "1 | 3",
                    "score": {"exact_match": 0.0},
                },
            ],
        )
    return run


def test_metrics_table_has_deltas_and_flags_what_got_worse() -> None:
    rows = metrics_table(METRICS)
    assert rows[0] == ["set", "metric", "base", "sft", "dpo", "Δ sft−base", "Δ dpo−sft"]
    em = next(r for r in rows if r[:2] == ["skills", "exact_match"])
    assert em[2:5] == ["0.0000", "0.5000", "0.3750"]
    assert em[5] == "+0.5000" and em[6].startswith("-0.1250") and "⚠" in em[6]
    loss = next(r for r in rows if r[0] == "skills" and r[1].startswith("loss"))
    assert loss[1] == "loss ↓" and "⚠" not in loss[5] and "⚠" in loss[6]  # lower is better: 0.9 -> 0.95 worse


def test_report_sections_warnings_and_self_contained_html(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    written = write_report(read_run(run), None, run / "report")
    md = (run / "report" / "report.md").read_text()
    for heading in (
        "## Run summary",
        "## Warnings",
        "## Metrics",
        "## Training",
        "## Data",
        "## Sample generations",
    ):
        assert heading in md
    assert "config digest: `" in md and "torch 2.13.0" in md
    assert "| sft | done | 5.0 min |" in md  # time per stage, and its budget share of 1 h
    warnings = " ".join(written["warnings"])
    assert "high reject rate: train.jsonl" in warnings and "10 of 40" in warnings
    assert "heavy truncation: 6 of 30 rows in sft_train" in warnings
    assert "loss spike in sft at step 10" in warnings
    assert "exact_match on skills got worse from sft to dpo" in warnings
    assert "preference_accuracy" not in warnings  # it improved
    # Sample generations side by side: base, sft, dpo outputs in one row, with the pipe escaped.
    assert "| What is 2 + 2? | 4 | four ✗ | 4 ✓ | 4 ✓ |" in md
    assert "1 \\| 3 ✗" in md
    assert set(written["plots"]) == {"sft_curves.png", "dpo_curves.png", "lengths.png"}
    page = (run / "report" / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3
    # Self-contained: no external scripts, stylesheets or images.
    assert not re.search(r"(src|href)=['\"]?(https?:|//|[\w./-]+\.(png|css|js))", page)
    assert "<td class='num worse'>-0.1250 ⚠</td>" in page


def test_compare_puts_runs_side_by_side_with_config_differences(tmp_path: Path) -> None:
    better = json.loads(json.dumps(METRICS))
    better["dpo"]["skills"]["exact_match"] = 0.625
    a = make_run(tmp_path / "lr-2e-3")
    b = make_run(tmp_path / "lr-1e-3", lr=1e-3, metrics=better)
    proc = tunepipe("report", "--compare", a, b, "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| dpo | skills | exact_match | 0.3750 | 0.6250 |" in md
    assert "| sft.learning_rate | 0.002 | 0.001 |" in md
    html_page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "lr-2e-3" in html_page and "data:image/png;base64," in html_page
    bad = tunepipe("report", "--compare", a, tmp_path / "nope", "--out", tmp_path / "cmp2")
    assert bad.returncode == 2 and "not a tunepipe run folder" in bad.stderr
    assert compare_runs([a, a], tmp_path / "cmp3").is_file()  # the same folder twice gets distinct names


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _share_near(img, rgb: tuple[int, int, int], tol: int = 12) -> float:
    px = img.convert("RGB").getdata()
    hits = sum(1 for p in px if all(abs(c - t) <= tol for c, t in zip(p, rgb, strict=True)))
    return hits / len(px)


@pytest.mark.skipif(
    _chromium() is None, reason="headless Chromium not installed (.ci/run installs Debian chromium)"
)
def test_report_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    from PIL import Image

    run = make_run(tmp_path / "run")
    write_report(read_run(run), None, run / "report")
    shot = tmp_path / "shot.png"
    page = (run / "report" / "report.html").resolve()
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1200,4000",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot)
    assert img.size == (1200, 4000)
    # The metrics table's header row (#2f5d8a) and the plots' line colour (#1f77b4) are on screen,
    # and the worse-delta cell is tinted (#fde2e1).
    assert _share_near(img, (0x2F, 0x5D, 0x8A)) > 0.002
    assert _share_near(img, (0x1F, 0x77, 0xB4), tol=20) > 0.0005
    assert _share_near(img, (0xFD, 0xE2, 0xE1), tol=4) > 0.0001
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert '<h2 id="metrics">Metrics</h2>' in dom and dom.count("<img") == 3
