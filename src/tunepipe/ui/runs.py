"""What the dashboard shows of a run folder, read from its files only (DESIGN §3): pipeline.json,
config.resolved.yaml, <stage>/log.jsonl, data/stats.json and rejects.jsonl, eval/, report/, logs/.

Nothing here imports torch or transformers, and nothing writes: the dashboard reads the run folder
the CLI writes. Every value leaves through `redaction.redact` (in the server)."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import parse_duration
from ..runfolder import LOCK_NAME

TRAINING_KEYS = ("loss", "learning_rate", "grad_norm")
LOWER_IS_BETTER = {"loss", "perplexity"}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_rows(path: Path, since: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of `path` from byte offset `since`: (rows, the offset after the last whole
    line). A line being written (no newline yet) is left for the next read."""
    try:
        with path.open("rb") as fh:
            fh.seek(since)
            chunk = fh.read()
    except OSError:
        return [], since
    end = chunk.rfind(b"\n") + 1
    rows = []
    for line in chunk[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, since + end


def config_of(run_dir: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load((run_dir / "config.resolved.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


def trained_stages(cfg: dict[str, Any]) -> list[str]:
    order = cfg.get("pipeline")
    if not isinstance(order, list):
        return []
    return [s for s in order if isinstance(s, str) and (cfg.get(s) or {}).get("enabled") is not False]


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "pipeline.json").is_file() or (path / LOCK_NAME).is_file())


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The live process that holds the run folder's lock (its PID, command), or None.

    The lock file keeps the last holder's PID after it ends, and PIDs are reused: a PID counts only
    while the kernel lists it as holding the flock on that file (/proc/locks). Read, never by taking
    the lock (that could make a starting run exit busy). Another machine's process (a shared runs
    folder) is not seen."""
    path = run_dir / LOCK_NAME
    info = _json(path)
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0 or info.get("host") not in (None, socket.gethostname()):
        return None
    try:
        inode = path.stat().st_ino
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in locks.splitlines():
        f = line.split()  # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:6815753 0 EOF"
        if len(f) > 5 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(inode):
            return info if f[4] == str(pid) else None
    return None


def status_of(stages: dict[str, Any], running: bool) -> tuple[str, str | None]:
    """(run status, current stage). Status: running, done, failed, stopped, interrupted (a stage says
    running but no process holds the folder: killed), pending."""
    current = next((n for n, r in stages.items() if r.get("status") == "running"), None)
    if running:
        return "running", current
    statuses = [r.get("status") for r in stages.values()]
    if current is not None:
        return "interrupted", current
    for bad in ("failed", "stopped"):
        if bad in statuses:
            return bad, next(n for n, r in stages.items() if r.get("status") == bad)
    if statuses and all(s in ("done", "disabled") for s in statuses):
        return "done", None
    return "pending", next(
        (n for n, r in stages.items() if r.get("status") not in ("done", "disabled")), None
    )


def time_used(stages: dict[str, Any], running: bool, now: float | None = None) -> float:
    """Seconds the stages took, the running one so far included (while a process runs it)."""
    now = now or time.time()
    total = 0.0
    for rec in stages.values():
        if not isinstance(rec, dict):
            continue
        if rec.get("status") == "running" and rec.get("started_at") and running:
            try:
                started = time.mktime(time.strptime(rec["started_at"], "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                continue
            total += max(0.0, now - started)
        else:
            total += float(rec.get("seconds") or 0.0)
    return round(total, 1)


def budget_of(cfg: dict[str, Any]) -> float | None:
    limit = (cfg.get("hardware") or {}).get("time_limit")
    if not limit:
        return None
    try:
        return parse_duration(str(limit))
    except ValueError:
        return None


def best_metric(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The headline: the first set's first metric, at its best over the models (lower is better for
    loss and perplexity)."""
    models = {m: sets for m, sets in metrics.items() if isinstance(sets, dict)}
    for sets in models.values():
        for set_name, vals in sets.items():
            name = next((k for k in vals if k != "n"), None) if isinstance(vals, dict) else None
            if name is None:
                continue
            found = {m: s.get(set_name, {}).get(name) for m, s in models.items()}
            found = {m: v for m, v in found.items() if isinstance(v, int | float)}
            if not found:
                continue
            pick = min if name in LOWER_IS_BETTER else max
            model = pick(found, key=lambda m: found[m])
            return {"metric": name, "set": set_name, "model": model, "value": found[model]}
    return None


def eta(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The training stage's progress from its last logged step: step, max_steps, seconds left."""
    last = next((r for r in reversed(rows) if isinstance(r.get("step"), int)), None)
    if not last or not last.get("max_steps"):
        return None
    step, total, elapsed = last["step"], last["max_steps"], last.get("elapsed_s")
    # Steps of this process only: a resumed stage keeps the earlier process's rows, whose clock
    # (`t0`) was another one.
    first = next((r for r in rows if r.get("elapsed_s") is not None and r.get("t0") == last.get("t0")), None)
    left = None
    if isinstance(elapsed, int | float) and first and step > first["step"]:
        per_step = (elapsed - first["elapsed_s"]) / (step - first["step"])
        left = round(per_step * max(0, total - step), 1)
    return {"step": step, "max_steps": total, "seconds_left": left}


def summary(run_dir: Path, job: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of the runs list."""
    state = _json(run_dir / "pipeline.json")
    stages = state.get("stages")
    stages = {k: v for k, v in stages.items() if isinstance(v, dict)} if isinstance(stages, dict) else {}
    cfg = config_of(run_dir)
    running = bool(job and job.get("running")) or holder(run_dir) is not None
    status, current = status_of(stages, running)
    return {
        "name": run_dir.name,
        "project": (cfg.get("project") or {}).get("name"),
        "status": status,
        "stage": current,
        "used_s": time_used(stages, running),
        "budget_s": budget_of(cfg),
        "best": best_metric(_json(run_dir / "eval" / "metrics.json")),
        "updated_at": state.get("updated_at"),
        "smoke": run_dir.name.endswith("-smoke"),
    }


def list_runs(root: Path, jobs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    if not root.is_dir():
        return []
    runs = []
    for d in sorted(root.iterdir()):
        if not is_run_dir(d):
            continue
        try:
            runs.append(summary(d, jobs.get(d.name)))
        except Exception as e:  # one odd folder does not hide the others
            runs.append({"name": d.name, "status": "unreadable", "stage": None, "error": str(e)[:200]})
    return sorted(runs, key=lambda r: r.get("updated_at") or "", reverse=True)


_WARNING = re.compile(r"\b(warning|warn)\b[: ]", re.I)


def log_warnings(run_dir: Path, limit: int = 30) -> list[str]:
    """tunepipe's own warning lines in logs/<stage>.log (what the console printed as warnings)."""
    out: list[str] = []
    logs = run_dir / "logs"
    if not logs.is_dir():
        return out
    for f in sorted(logs.glob("*.log")):
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("warning:", "[")) and _WARNING.search(line) and line not in out:
                out.append(line.strip()[:400])
    return out[-limit:]


def detail(run_dir: Path, job: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the run page shows, but the curves (streamed by /events)."""
    from ..stages import report
    from ..stages.registry import get, is_training_stage

    run = report.read_run(run_dir)
    cfg = config_of(run_dir)
    stages = run.pipeline.get("stages") or {}
    base = summary(run_dir, job)
    trained = trained_stages(cfg)
    curves = {s: report.curves_of(s) if is_training_stage(s) else report.COMMON_CURVES for s in trained}
    titles = {s: get(s).title if is_training_stage(s) else s for s in trained}
    timeline = []
    for name, rec in stages.items():
        timeline.append(
            {
                "name": name,
                "title": titles.get(name, name),
                "status": rec.get("status"),
                "seconds": rec.get("seconds"),
                "summary": rec.get("summary"),
                "error": rec.get("error"),
                "gates": rec.get("gates") or [],
                "started_at": rec.get("started_at"),
            }
        )
    progress = None
    if base["stage"] in trained:
        progress = eta(read_rows(run_dir / base["stage"] / "log.jsonl")[0])
    budget_end = run.pipeline.get("budget_end")
    chat_models = ["base", *(s for s in trained if (stages.get(s) or {}).get("status") == "done")]
    rejects = run.rejects
    command = run.pipeline.get("command") or {}
    return {
        **base,
        "timeline": timeline,
        "curves": {s: [{"key": k, "label": label} for k, label in c] for s, c in curves.items()},
        "stage_titles": titles,
        "progress": progress,
        "budget_left_s": round(budget_end - time.time(), 1)
        if isinstance(budget_end, int | float) and base["status"] == "running"
        else None,
        "warnings": [*report.warnings_for(run), *log_warnings(run_dir)],
        "data": {
            "sources": run.stats.get("sources", []),
            "splits": run.stats.get("splits", {}),
            "rejects": rejects[:50],
            "rejects_total": len(rejects),
        },
        "metrics": report.metrics_table(run.metrics) if run.metrics else [],
        "samples": report.sample_tables(run),
        "report": (run_dir / "report" / "report.html").is_file(),
        "chat_models": chat_models,
        "config": run.config_text,
        "command": " ".join(["tunepipe", *command.get("argv", [])]) if command else None,
        "resumable": bool(command.get("resumable")) and base["status"] != "running",
        "stoppable": base["status"] == "running",
    }
