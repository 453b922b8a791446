"""Pipeline stages. Each module exposes `run(ctx) -> StageResult`; they hand off only through the
run folder (DESIGN §3), so any stage can be rerun, resumed or tested on its own."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config


class GateFailed(Exception):
    """A stage ran but its gate did not pass (exit code 3)."""


class StageStopped(Exception):
    """Training stopped early with a complete checkpoint (time budget or signal): exit 75, and the
    next `tunepipe run` resumes from that checkpoint."""


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str


@dataclass
class StageResult:
    summary: str
    gates: list[Gate] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]


@dataclass
class StageContext:
    cfg: Config
    run_dir: Path
    smoke: bool = False
    log: Callable[[str], None] = print
    fingerprint: str = ""  # the stage's input fingerprint: checkpoints are only resumed under the same one
    deadline: float | None = None  # time.time() by which a training stage must have stopped (time budget)
    verbose: bool = False  # --verbose: library warnings and raw trainer logs on the terminal too
    budget_end: float | None = None  # time.time() by which the whole run must end (hardware.time_limit)
    # Set by the launcher in a process group: the (micro-batch, accumulation) to start from after an
    # out-of-memory relaunch and what changed so far; the file whose presence asks every rank to stop.
    micro_batch: tuple[int, int] | None = None
    batch_changes: list[str] = field(default_factory=list)
    stop_file: Path | None = None

    def stage_dir(self, name: str) -> Path:
        d = self.run_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"


def write_stage_json(
    stage_dir: Path,
    name: str,
    result: StageResult,
    started: float,
    status: str,
    fingerprint: str | None = None,
) -> None:
    """stage.json is written last, atomically: a stage without it (or with status != done) is not done.
    It holds the stage's input fingerprint, so pipeline.json can be rebuilt from it."""
    from ..runfolder import write_atomic

    payload = {
        "stage": name,
        "status": status,
        "fingerprint": fingerprint,
        "summary": result.summary,
        "gates": [asdict(g) for g in result.gates],
        "outputs": result.outputs,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
    }
    write_atomic(stage_dir / "stage.json", json.dumps(payload, indent=2, default=str))
