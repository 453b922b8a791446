"""Training callbacks that keep a run honest: step logs on disk, complete-checkpoint markers,
stops for the time budget and signals, and fault hooks for tests.

(The time-budget, OOM-recovery and signal guards build on these.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .dist import is_main


class JsonlLogCallback(TrainerCallback):
    """Append every logged training step to `<stage>/log.jsonl`: {"step", "loss", ...}.

    Resuming from step S keeps the rows up to S and drops those logged after it (the resumed run
    logs them again), so the file continues without duplicated steps."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.t0 = time.time()
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if not is_main():  # under DDP only the main process writes the log
            return
        if resume_step and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line + "\n")
        self.path.write_text("".join(kept))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        row = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "elapsed_s": round(time.time() - self.t0, 2),
            "max_steps": state.max_steps,  # for progress and ETA (tunepipe ui)
            "t0": round(self.t0, 3),  # this process's clock start: elapsed_s is measured from it
        }
        row.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


COMPLETE = "tunepipe-complete.json"


def fault(kind: str, stage: str) -> int | None:
    """Fault injection for tests: TUNEPIPE_FAULT="<kind>:<stage>:<step>[:<rank>]" -> the step, else
    None. With a rank, only that process of a process group sees the fault."""
    from .dist import rank

    spec = os.environ.get("TUNEPIPE_FAULT", "")
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) in (3, 4) and parts[0] == kind and parts[1] == stage:
            if len(parts) == 4 and int(parts[3]) != rank():
                continue
            return int(parts[2])
    return None


def _fired(key: str) -> bool:
    """Whether a one-shot fault fired already: in this process, or (TUNEPIPE_FAULT_STATE names a file)
    in any process of this test, so that a relaunched process group does not fire it again."""
    state = os.environ.get("TUNEPIPE_FAULT_STATE")
    if key in _FIRED:
        return True
    return bool(state) and Path(state).is_file() and key in Path(state).read_text().split()


def _fire(key: str) -> None:
    _FIRED.add(key)
    state = os.environ.get("TUNEPIPE_FAULT_STATE")
    if state:
        with open(state, "a") as fh:
            fh.write(key + "\n")


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_dirs(folder: Path) -> list[Path]:
    """The trainer's `checkpoint-<step>` folders in `folder`, oldest first. Exact names only: a folder
    moved aside (`corrupt-checkpoint-6`) or renamed by hand (`checkpoint-6.bak`) is never resumed or
    rotated away."""
    found = [d for d in folder.glob("checkpoint-*") if _CHECKPOINT_NAME.fullmatch(d.name) and d.is_dir()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the trainer has written all of it (weights, optimizer,
    scheduler, RNG, trainer state): files fsynced, then the marker written atomically. Resume only
    trusts marked checkpoints, so a crash in the middle of a save never yields a half checkpoint.

    The marker holds a manifest of the checkpoint's files (size, and sha256 up to HASH_LIMIT), so a
    file that changed after the save (a bad disk, a truncated copy) is caught by `verify` before
    resuming, not by torch.load in the middle of it."""

    HASH_LIMIT = 256 * 2**20  # bytes; bigger files (a full model's shards, its optimizer) by size only

    def __init__(self, stage: str, fingerprint: str, keep: int = 2):
        self.stage = stage
        self.fingerprint = fingerprint
        self.keep = keep

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if getattr(args, "world_size", 1) > 1:
            import torch.distributed as dist

            # Every process writes its own files (rng_state_<rank>.pth, ZeRO shards) with no barrier
            # before this callback: wait for all of them before the manifest records sizes and hashes.
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        if fault("kill_in_save", self.stage) == state.global_step:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: files written, marker not yet
        _fsync_tree(ckpt)
        losses = [
            h["loss"] for h in state.log_history if "loss" in h and h.get("step", 0) <= state.global_step
        ]
        marker = {
            "step": state.global_step,
            "fingerprint": self.fingerprint,
            "loss": losses[-1] if losses else None,
            "files": self.manifest(ckpt),
        }
        tmp = ckpt / f".{COMPLETE}.tmp"
        tmp.write_text(json.dumps(marker))
        os.replace(tmp, ckpt / COMPLETE)
        self._rotate(Path(args.output_dir))

    @classmethod
    def manifest(cls, ckpt: Path) -> dict[str, dict[str, Any]]:
        """{path inside the checkpoint: {"size": bytes, "sha256": hex}} for every file but the marker."""
        files: dict[str, dict[str, Any]] = {}
        for f in sorted(ckpt.rglob("*")):
            rel = f.relative_to(ckpt).as_posix()
            if not f.is_file() or rel == COMPLETE or f.name.startswith(f".{COMPLETE}"):
                continue
            size = f.stat().st_size
            files[rel] = {"size": size, **({"sha256": _sha256(f)} if size <= cls.HASH_LIMIT else {})}
        return files

    @staticmethod
    def verify(ckpt: Path) -> str | None:
        """Why the marked checkpoint `ckpt` cannot be resumed ("<file>: <what is wrong>"), or None.

        trainer_state.json must parse, and every file in the marker's manifest must have the size and
        sha256 it had when saved. Markers written before manifests existed only get the first check."""
        try:
            marker = json.loads((ckpt / COMPLETE).read_text())
            if not isinstance(marker, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            return f"{COMPLETE}: unreadable ({e})"
        try:
            if not isinstance(json.loads((ckpt / "trainer_state.json").read_text()), dict):
                return "trainer_state.json: not a JSON object"
        except FileNotFoundError:
            return "trainer_state.json: missing"
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
            return f"trainer_state.json: not valid JSON ({e})"
        files = marker.get("files")
        for rel, saved in (files if isinstance(files, dict) else {}).items():
            f = ckpt / rel
            if not f.is_file():
                return f"{rel}: missing"
            size = f.stat().st_size
            if size != saved.get("size"):
                return f"{rel}: {size} bytes, {saved.get('size')} when it was saved"
            if "sha256" in saved and _sha256(f) != saved["sha256"]:
                return f"{rel}: its content changed after it was saved (sha256 differs)"
        return None

    def _rotate(self, folder: Path) -> None:
        """Keep the newest `keep` complete checkpoints and the one with the lowest logged loss; the
        newest complete one is never deleted. (The trainer's own rotation is off: it cannot tell
        complete checkpoints from interrupted ones.)"""
        done = []
        for d in checkpoint_dirs(folder):
            with contextlib.suppress(OSError, ValueError):
                marker = json.loads((d / COMPLETE).read_text())
                done.append((marker if isinstance(marker, dict) else {}, d))  # oldest first
        keep = {d for _, d in done[-self.keep :]}
        scored = [
            (m["loss"], d) for m, d in done if isinstance(m.get("loss"), float) and math.isfinite(m["loss"])
        ]
        if scored:
            keep.add(min(scored, key=lambda x: x[0])[1])
        for _, d in done:
            if d not in keep:
                shutil.rmtree(d, ignore_errors=True)


class StopRequest(TrainerCallback):
    """Stops training at the next step boundary with a checkpoint, for a signal or the time budget.

    `reason` is set when a stop was requested; the stage then reports exit 75 (resume later)."""

    def __init__(self, deadline: float | None = None, margin_s: float = 0.0, stop_file: Path | None = None):
        self.deadline = deadline
        self.margin_s = margin_s
        self.stop_file = stop_file  # the launcher's stop request (it got SIGTERM/SIGINT), in a process group
        self.reason: str | None = None
        self.step_times: list[float] = []
        self._t: float | None = None
        self._old_handlers: dict[int, Any] = {}

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers there
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reason = f"signal {signal.Signals(signum).name}"

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._t = time.time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._t is not None:
            self.step_times.append(time.time() - self._t)
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"{self.stop_file.read_text().strip() or 'stop requested'} to the launching process"
        if self.reason is None and self.deadline is not None and len(self.step_times) >= 2:
            # After warm-up, the measured step time says whether one more step and a save still fit.
            recent = self.step_times[-5:]
            step = sum(recent) / len(recent)
            if time.time() + 2 * step + self.margin_s > self.deadline:
                self.reason = f"time budget: stopping at step {state.global_step} ({step:.1f} s/step)"
        # Decided once for all processes: any rank that wants to stop stops every rank at this step
        # (ranks stopping at different steps would wait forever in each other's collectives).
        from .launch import agree_max

        if agree_max(1 if self.reason else 0) and self.reason is None:
            self.reason = f"another process stopped the run at step {state.global_step}"
        if self.reason is not None:
            control.should_save = True
            control.should_training_stop = True


_FIRED: set[str] = set()  # faults fire once per process, also across trainer rebuilds


class FaultInjector(TrainerCallback):
    """Test hooks, active only when TUNEPIPE_FAULT is set: `oom:<stage>:<step>` raises a CUDA-style
    out-of-memory error at that step (CPU has no such error to provoke), `slow_step:<stage>:<ms>`
    makes every step take at least that long (a long training on a tiny model)."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import torch

        step = fault("oom", self.stage)
        key = f"oom:{self.stage}:{step}"
        if step is not None and state.global_step + 1 == step and not _fired(key):
            _fire(key)
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by TUNEPIPE_FAULT={key})")

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ms = fault("slow_step", self.stage)
        if ms:
            time.sleep(ms / 1000)
