"""What a training stage shows on the console: one readable line per logging step (stage, step/total,
loss, learning rate, tokens/s, ETA, time left in the budget), drawn under a rich progress bar on a
terminal and as plain lines elsewhere; and where the libraries' own output goes while a stage runs.

`ConsoleProgress` is the trainer callback that prints the steps. `capture_library_output` is the
context a stage runs in: Python warnings, the logging of transformers, TRL, PEFT, accelerate, datasets,
torch and huggingface_hub, and the trainer's raw log dicts go to the stage's log file instead of the
terminal (and to stderr as well with --verbose).

Importing this module imports neither torch nor transformers: the pipeline wraps every stage in
`capture_library_output`, and a run with nothing to do stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TextIO

from .dist import is_main

LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "torch", "huggingface_hub")
TRAINER_LOGGER = "tunepipe.trainer"  # the trainer's raw log dicts (and a copy of each step line)
_ON_TERMINAL = "tunepipe_on_terminal"  # record attribute; False: already on stdout, file only

_trainer_log = logging.getLogger(TRAINER_LOGGER)


def clock(seconds: float) -> str:
    """H:MM:SS, as in `ETA 0:01:05`."""
    return str(timedelta(seconds=max(0, round(seconds))))


def stdout_is_terminal() -> bool:
    """A progress bar only on an interactive terminal. CI logs and pipes get plain lines; FORCE_COLOR,
    which some CI systems set, does not make a log file a terminal."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


@dataclass(frozen=True)
class StepView:
    """One logging step as the console shows it; None fields are left out of the line."""

    stage: str
    step: int
    total: int
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    tokens_estimated: bool = False  # from batch size x max_length: an upper bound, shown as <=
    eta_s: float | None = None
    budget_left_s: float | None = None  # None: the run has no time limit
    # The stage's own headline metric after the loss (GRPO: reward; DPO: reward accuracy).
    metrics: tuple[tuple[str, float], ...] = ()

    def values(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        parts += [f"{label} {value:.3f}" for label, value in self.metrics]
        if self.learning_rate is not None:
            parts.append("lr 0" if self.learning_rate == 0 else f"lr {self.learning_rate:.1e}")
        if self.tokens_per_s is not None:
            parts.append(f"{'<=' if self.tokens_estimated else ''}{self.tokens_per_s:,.0f} tok/s")
        if self.eta_s is not None:
            parts.append(f"ETA {clock(self.eta_s)}")
        if self.budget_left_s is not None:
            parts.append(f"budget left {clock(self.budget_left_s)}")
        return "  ".join(parts)

    def line(self) -> str:
        """`[sft] step 12/40  loss 1.234  lr 1.9e-04  1,234 tok/s  ETA 0:01:05  budget left 0:41:10`"""
        values = self.values()
        return f"[{self.stage}] step {self.step}/{self.total}" + (f"  {values}" if values else "")


_LIVE: weakref.WeakSet[ConsoleProgress] = weakref.WeakSet()  # progress bars being drawn now


def close_displays() -> None:
    """Stop every progress bar still drawn: a trainer that raised (out of memory, a failed stage) never
    reaches on_train_end, and a live bar would keep redrawing over what is printed next."""
    for display in list(_LIVE):
        display.close()


class ConsoleProgress:
    """Trainer callback: on each log carrying a loss, one `StepView.line()` on stdout (main process
    only), above a rich progress bar with the latest values when stdout is a terminal. Every log dict,
    as the trainer logged it, goes to the `tunepipe.trainer` logger: the stage log file under
    `capture_library_output`, nowhere without it.

    tokens/s: the trainer's `num_input_tokens_seen` (trainer_args turns it on) over the time since the
    previous log; without it, batch size x accumulation x processes x max_length per step, an upper bound.
    ETA: the mean wall time of a step after the first (which also loads and warms up) times the steps
    left. Budget left: `budget_end` (time.time() based) minus now.

    Not a TrainerCallback subclass, so that importing this module does not import transformers: the
    trainer calls every event by name, and the events this class does not define do nothing, as in
    TrainerCallback."""

    def __init__(
        self,
        stage: str,
        budget_end: float | None = None,
        *,
        shown: tuple[tuple[str, str], ...] = (),  # (log key, label) shown after the loss
        terminal: bool | None = None,
        console: Any = None,  # a rich Console for the bar (tests); default: one on stdout
        time_source: Callable[[], float] = time.time,
    ):
        self.stage = stage
        self.shown = shown
        self.budget_end = budget_end
        self.terminal = stdout_is_terminal() if terminal is None else terminal
        self.enabled = is_main()  # under DDP every process runs the callbacks; one prints
        self._console = console
        self._now = time_source
        self._progress: Any = None
        self._task: Any = None
        self._latest: StepView | None = None
        self._begin(self._now(), 0, 0)

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("on_"):
            return _ignore_event
        raise AttributeError(name)

    def _begin(self, now: float, step: int, tokens: int) -> None:
        self._t0, self._step0 = now, step
        self._first_end: tuple[float, int] | None = None  # (time, step) at the end of the first step
        self._last_end: tuple[float, int] | None = None
        self._last_log: tuple[float, int, float | None] = (now, step, tokens)  # (time, step, tokens seen)

    # ------------------------------------------------------------------ trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.enabled:
            return
        # A resumed run starts at its checkpoint's step and token count.
        self._begin(self._now(), state.global_step, getattr(state, "num_input_tokens_seen", 0) or 0)
        self._latest = None
        if self.terminal:
            self._open_display(state.max_steps, state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.enabled:
            return
        now = self._now()
        if self._first_end is None:
            self._first_end = (now, state.global_step)
        self._last_end = (now, state.global_step)
        self._update_display(state)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not self.enabled or not logs:
            return
        _trainer_log.info("[%s] step %d %s", self.stage, state.global_step, _rounded(logs))
        if "loss" not in logs:  # the end-of-training summary, an evaluation: file only
            return
        view = self._view(args, state, logs)
        self._latest = view
        line = view.line()
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            self._update_display(state)
        else:
            print(line, file=sys.stdout, flush=True)
        _trainer_log.info(line, extra={_ON_TERMINAL: False})

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ values

    def _view(self, args: Any, state: Any, logs: dict[str, Any]) -> StepView:
        now, step = self._now(), state.global_step
        t_prev, step_prev, tokens_prev = self._last_log
        seen = logs.get("num_input_tokens_seen")
        seen = seen if isinstance(seen, int | float) else None
        rate, estimated = None, False
        if now > t_prev:
            if seen is not None and tokens_prev is not None:
                rate = (seen - tokens_prev) / (now - t_prev)
            elif (per_step := _tokens_per_step(args)) and step > step_prev:
                rate, estimated = per_step * (step - step_prev) / (now - t_prev), True
        self._last_log = (now, step, seen)
        lr = logs.get("learning_rate")
        return StepView(
            stage=self.stage,
            step=step,
            total=state.max_steps,
            loss=float(logs["loss"]),
            learning_rate=float(lr) if isinstance(lr, int | float) else None,
            tokens_per_s=rate,
            tokens_estimated=estimated,
            eta_s=self._eta_s(step, state.max_steps),
            budget_left_s=self._budget_left_s(now),
            metrics=tuple(
                (label, float(logs[key]))
                for key, label in self.shown
                if isinstance(logs.get(key), int | float)
            ),
        )

    def _mean_step_s(self) -> float | None:
        if self._first_end is None or self._last_end is None:
            return None
        (t1, s1), (t2, s2) = self._first_end, self._last_end
        if s2 > s1:
            return (t2 - t1) / (s2 - s1)
        return (t1 - self._t0) / (s1 - self._step0) if s1 > self._step0 else None

    def _eta_s(self, step: int, total: int) -> float | None:
        mean = self._mean_step_s()
        return None if mean is None else mean * max(0, total - step)

    def _budget_left_s(self, now: float) -> float | None:
        return None if self.budget_end is None else max(0.0, self.budget_end - now)

    # ------------------------------------------------------------------ the terminal bar

    def _open_display(self, total: int, done: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        close_displays()  # one bar at a time: a trainer rebuilt after out-of-memory starts a new one
        self._progress = Progress(
            TextColumn(f"[{self.stage}]", markup=False),
            BarColumn(),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}", markup=False),
            TextColumn("{task.fields[values]}", markup=False),
            TimeElapsedColumn(),
            console=self._console or Console(highlight=False),
            refresh_per_second=2,  # the elapsed clock ticks during long steps
        )
        self._task = self._progress.add_task(self.stage, total=total, completed=done, values="")
        self._progress.start()
        _LIVE.add(self)

    def _update_display(self, state: Any) -> None:
        if self._progress is None:
            return
        step = state.global_step
        view = self._latest or StepView(self.stage, step, state.max_steps)
        view = replace(
            view, eta_s=self._eta_s(step, state.max_steps), budget_left_s=self._budget_left_s(self._now())
        )
        self._progress.update(self._task, completed=step, values=view.values())

    def close(self) -> None:
        """Stop the bar (left on screen at its last state)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        _LIVE.discard(self)


def _ignore_event(*args: Any, **kwargs: Any) -> None:
    return None


def _tokens_per_step(args: Any) -> int | None:
    try:
        per_step = (
            args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * getattr(args, "world_size", 1)
            * args.max_length
        )
    except (AttributeError, TypeError):  # no max_length (None), or not a training config
        return None
    return int(per_step) or None


def _rounded(logs: dict[str, Any]) -> dict[str, Any]:
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in logs.items()}


def remove_library_printers(trainer: Any) -> None:
    """Take transformers' console callbacks off a trainer: the raw log dicts it prints under
    disable_tqdm (PrinterCallback) and, should disable_tqdm be off, its tqdm bar (ProgressCallback).
    ConsoleProgress shows the steps instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    remove = getattr(trainer, "remove_callback", None)  # a trainer-like object without callbacks: none
    for cls in (PrinterCallback, ProgressCallback) if remove else ():
        remove(cls)


# ---------------------------------------------------------------------- library output


class _Sink:
    """The stage log file (each entry stamped HH:MM:SS, as StageLog writes it) and, with --verbose,
    the terminal."""

    def __init__(self, log_file: TextIO | None, echo: Callable[[str], None] | None):
        self.log_file, self.echo = log_file, echo

    def write(self, text: str, terminal: bool = True) -> None:
        from .redaction import redact_text  # libraries log URLs and headers: no secret reaches the file

        text = redact_text(text.rstrip("\n"))
        if self.log_file is not None and not self.log_file.closed:
            self.log_file.write(f"{time.strftime('%H:%M:%S')} {text}\n")
            self.log_file.flush()
        if terminal and self.echo is not None:
            self.echo(text)

    def showwarning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        self.write(warnings.formatwarning(message, category, filename, lineno, line))


class _SinkHandler(logging.Handler):
    def __init__(self, sink: _Sink):
        super().__init__()
        self.sink = sink
        self.library = logging.Formatter("%(levelname)s %(name)s: %(message)s")
        self.own = logging.Formatter("%(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            own = record.name == TRAINER_LOGGER
            text = (self.own if own else self.library).format(record)
            self.sink.write(text, terminal=getattr(record, _ON_TERMINAL, True))
        except Exception:
            self.handleError(record)


def _to_terminal(handler: logging.Handler) -> bool:
    """A handler printing to the console (a library's default stderr handler), not a file of its own."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)  # torch's trace handler opens its file lazily: None
    return stream is not None and (
        stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
        or getattr(stream, "name", None) in ("<stderr>", "<stdout>")
    )


class _HeldBack(list):  # type: ignore[type-arg]
    """A captured logger's handler list. Iterated, it holds the capture's handler and the logger's own
    non-console handlers; `restore` is the list put back on exit. A library that configures its logging
    while captured (transformers and datasets add their stderr handler on first import) adds to
    `restore`, so it prints again after the stage, not during it."""

    def __init__(self, visible: list[logging.Handler], restore: list[logging.Handler]):
        super().__init__(visible)
        self.restore = list(restore)

    def append(self, handler: logging.Handler) -> None:
        if handler not in self.restore:
            self.restore.append(handler)
        if not _to_terminal(handler) and not list.__contains__(self, handler):
            super().append(handler)

    def remove(self, handler: logging.Handler) -> None:
        if handler in self.restore:
            self.restore.remove(handler)
        if list.__contains__(self, handler):
            super().remove(handler)

    def __contains__(self, handler: object) -> bool:
        return handler in self.restore or list.__contains__(self, handler)


def _capture_logger(logger: logging.Logger, handler: logging.Handler, root: bool) -> Callable[[], None]:
    """Send what `logger` would print to the console to `handler`; returns the undo. A library's root
    logger stops propagating (its records reach the capture, not the root logger's console handler);
    a sub-logger with console handlers of its own (torch has dozens) loses them, and its records reach
    the capture directly or through its parent."""
    saved_handlers, saved_propagate = logger.handlers, logger.propagate
    kept = [h for h in saved_handlers if not _to_terminal(h)]
    visible = [handler, *kept] if root or not logger.propagate else kept
    logger.handlers = _HeldBack(visible, saved_handlers)
    if root:
        logger.propagate = False

    def restore() -> None:
        current = logger.handlers
        logger.handlers = current.restore if isinstance(current, _HeldBack) else saved_handlers
        logger.propagate = saved_propagate

    return restore


def _library_loggers() -> list[tuple[logging.Logger, bool]]:
    """The libraries' root loggers, and their existing sub-loggers that print to the console themselves."""
    roots = [*LIBRARIES, TRAINER_LOGGER]
    found = [(logging.getLogger(name), True) for name in roots]
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (
            isinstance(logger, logging.Logger)
            and any(name.startswith(f"{r}.") for r in roots)
            and any(_to_terminal(h) for h in logger.handlers)
        ):
            found.append((logger, False))
    return found


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # sys.stderr at call time: above a live progress bar


def _quiet_library_bars() -> Callable[[], None]:
    """The libraries' own progress bars (loading weights, dataset maps, downloads) off while a stage
    runs: the stage's console is its step lines (and eval's bar). Returns the function that puts
    each back as it was."""
    undo: list[Callable[[], None]] = []
    for module, is_on, off, on in (
        (
            "transformers.utils.logging",
            "is_progress_bar_enabled",
            "disable_progress_bar",
            "enable_progress_bar",
        ),
        ("datasets", "is_progress_bar_enabled", "disable_progress_bars", "enable_progress_bars"),
        (
            "huggingface_hub.utils",
            "are_progress_bars_disabled",
            "disable_progress_bars",
            "enable_progress_bars",
        ),
    ):
        if module not in sys.modules:  # not imported yet: importing it here would configure its logging
            continue
        try:
            mod = sys.modules[module]
            enabled = getattr(mod, is_on)()
            if is_on.startswith("are_"):
                enabled = not enabled
        except (ImportError, AttributeError):
            continue
        if enabled:
            getattr(mod, off)()
            undo.append(getattr(mod, on))

    def restore() -> None:
        for fn in undo:
            fn()

    return restore


@contextlib.contextmanager
def capture_library_output(
    log_file: TextIO | None, verbose: bool = False, echo: Callable[[str], None] | None = None
) -> Iterator[None]:
    """While a stage runs: Python warnings (`warnings.showwarning`), the records of the libraries'
    loggers (at the levels they are set to) and the trainer's raw log dicts go to `log_file`, the open
    stage log, instead of the terminal; with `verbose` to `echo` as well (default: stderr; main process
    only, the other processes of a DDP run have their own log file). Everything is put back on exit,
    and any progress bar still drawn is stopped.

    Sub-loggers created inside the context with console handlers of their own are not covered (torch
    makes its own when first imported: the pipeline imports torch before the first stage runs)."""
    sink = _Sink(log_file, (echo or _stderr) if verbose and is_main() else None)
    handler = _SinkHandler(sink)
    saved_showwarning = warnings.showwarning
    saved_level = _trainer_log.level
    undo = [] if verbose else [_quiet_library_bars()]
    undo += [_capture_logger(logger, handler, root) for logger, root in _library_loggers()]
    _trainer_log.setLevel(logging.INFO)
    warnings.showwarning = sink.showwarning
    try:
        yield
    finally:
        close_displays()
        warnings.showwarning = saved_showwarning
        _trainer_log.setLevel(saved_level)
        for restore in reversed(undo):
            restore()
