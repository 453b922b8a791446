"""Runs the dashboard starts: the `tunepipe` command as a subprocess, never training state of its own.

Start = `python -m tunepipe run CONFIG [--smoke] [KEY=VALUE ...]` in the project folder; Stop = SIGTERM
to that process (the CLI saves a complete checkpoint and exits 75); Resume = the command recorded in
the run's pipeline.json, run again from its folder. A run started in a terminal is stopped the same
way, through the PID in its lock file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..redaction import redact_text
from . import runs

OUTPUT_DIR = ".tunepipe-ui"  # under the runs folder: each started command's terminal output


@dataclass
class Job:
    run: str
    argv: list[str]
    cwd: Path
    output: Path
    proc: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.time)

    def state(self) -> dict[str, Any]:
        code = self.proc.poll()
        return {
            "running": code is None,
            "pid": self.proc.pid,
            "returncode": code,
            "command": " ".join(["tunepipe", *self.argv]),
            "started_at": self.started_at,
        }


class Jobs:
    def __init__(self, root: Path):
        self.root = root
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def states(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: job.state() for name, job in self._jobs.items()}

    def state(self, run: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(run)
        return job.state() if job else None

    def start(self, run: str, argv: list[str], cwd: Path) -> Job:
        """Start `tunepipe ARGV` in `cwd` for the run folder `run` (a child of the runs folder)."""
        with self._lock:
            old = self._jobs.get(run)
            if old and old.proc.poll() is None:
                raise RuntimeError(f"{run} is running already (PID {old.proc.pid})")
            if runs.holder(self.root / run) is not None:
                raise RuntimeError(f"{run} is in use by another tunepipe process")
            out_dir = self.root / OUTPUT_DIR
            out_dir.mkdir(parents=True, exist_ok=True)
            output = out_dir / f"{run}.out"
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
            with output.open("ab") as fh:
                fh.write(redact_text(f"$ tunepipe {' '.join(argv)}\n").encode())
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tunepipe", *argv],
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # the UI's Ctrl-C does not stop the runs it started
                )
            job = Job(run, argv, cwd, output, proc)
            self._jobs[run] = job
            threading.Thread(target=self._reap, args=(job,), daemon=True).start()
            return job

    def _reap(self, job: Job) -> None:
        code = job.proc.wait()
        with contextlib.suppress(OSError), job.output.open("a") as fh:
            fh.write(f"[tunepipe ui] exit code {code}\n")

    def stop(self, run: str) -> int:
        """SIGTERM to the process that runs `run`: the dashboard's own child, else the lock holder.
        Returns its PID; LookupError when nothing runs there."""
        with self._lock:
            job = self._jobs.get(run)
        if job and job.proc.poll() is None:
            job.proc.send_signal(signal.SIGTERM)
            return job.proc.pid
        info = runs.holder(self.root / run)
        if info is None:
            raise LookupError(f"{run} is not running")
        os.kill(int(info["pid"]), signal.SIGTERM)
        return int(info["pid"])

    def output(self, run: str, limit: int = 20_000) -> str:
        path = self.root / OUTPUT_DIR / f"{run}.out"
        try:
            start = max(0, path.stat().st_size - limit)
            with path.open("rb") as fh:
                fh.seek(start)
                data = fh.read()
            if start:  # from the first whole line: a cut secret would match no pattern
                data = data.split(b"\n", 1)[-1]
            return redact_text(data.decode(errors="replace"))
        except OSError:
            return ""
