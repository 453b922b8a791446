"""Training callbacks that keep a run honest: step logs on disk and a stop on a non-finite loss.

(The time-budget, OOM-recovery and signal guards build on these.)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class JsonlLogCallback(TrainerCallback):
    """Append every logged training step to `<stage>/log.jsonl`: {"step", "loss", ...}."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.t0 = time.time()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        row = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "elapsed_s": round(time.time() - self.t0, 2),
        }
        row.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


class NonFiniteLossGuard(TrainerCallback):
    """Stop at the first NaN/inf loss instead of training on garbage; the gate then fails the stage."""

    def __init__(self) -> None:
        self.bad_step: int | None = None

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss) and self.bad_step is None:
            self.bad_step = state.global_step
            control.should_training_stop = True
