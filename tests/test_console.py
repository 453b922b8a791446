"""The training console: one readable line per logging step, a rich bar on a terminal, and the
libraries' warnings and log records in the stage log file instead of the terminal."""

from __future__ import annotations

import io
import logging
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import tunepipe, write_config

from tunepipe.console import ConsoleProgress, capture_library_output

ARGS = SimpleNamespace(
    per_device_train_batch_size=2, gradient_accumulation_steps=1, world_size=1, max_length=96
)


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _state(step: int, max_steps: int = 4, tokens: int = 0) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=max_steps, num_input_tokens_seen=tokens)


def _train(cb: ConsoleProgress, clock: Clock, steps: list[tuple[float, dict]], max_steps: int = 4) -> None:
    """on_train_begin at clock.t, then for each (seconds the step took, logs): on_step_end and on_log."""
    cb.on_train_begin(ARGS, _state(0, max_steps), None)
    for step, (seconds, logs) in enumerate(steps, start=1):
        clock.t += seconds
        cb.on_step_end(ARGS, _state(step, max_steps), None)
        cb.on_log(ARGS, _state(step, max_steps), None, logs=dict(logs))


def test_one_plain_line_per_logged_loss_with_tokens_eta_and_budget(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock(1000.0)
    cb = ConsoleProgress("sft", budget_end=1000.0 + 3600, terminal=False, time_source=clock)
    _train(
        cb,
        clock,
        [
            # The first step also loads and warms up: 10 s; the second takes 2 s.
            (10.0, {"loss": 1.2341, "learning_rate": 2e-4, "num_input_tokens_seen": 1000}),
            (2.0, {"loss": 1.0, "learning_rate": 1.9e-4, "num_input_tokens_seen": 3000}),
        ],
    )
    cb.on_log(ARGS, _state(2), None, logs={"train_runtime": 12.0, "train_loss": 1.1})  # summary: no line
    cb.on_train_end(ARGS, _state(2), None)
    out = capsys.readouterr().out
    assert out.splitlines() == [
        # ETA from the first step alone (10 s x 3 left); tokens/s over the 10 s since training began.
        "[sft] step 1/4  loss 1.234  lr 2.0e-04  100 tok/s  ETA 0:00:30  budget left 0:59:50",
        # Mean step time after the first (2 s x 2 left); 2,000 tokens in the last 2 s.
        "[sft] step 2/4  loss 1.000  lr 1.9e-04  1,000 tok/s  ETA 0:00:04  budget left 0:59:48",
    ]
    assert "\x1b" not in out


def test_without_a_time_limit_or_a_token_count(capsys: pytest.CaptureFixture[str]) -> None:
    """No budget: no budget field. No num_input_tokens_seen: batch x max_length per step, an upper bound."""
    clock = Clock(0.0)
    cb = ConsoleProgress("dpo", terminal=False, time_source=clock)
    _train(cb, clock, [(4.0, {"loss": 0.6931, "learning_rate": 0.0})], max_steps=3)
    # 2 rows x 96 tokens in 4 s.
    assert capsys.readouterr().out == "[dpo] step 1/3  loss 0.693  lr 0  <=48 tok/s  ETA 0:00:08\n"


def test_the_stages_headline_metric_follows_the_loss(capsys: pytest.CaptureFixture[str]) -> None:
    """GRPO's console line carries its mean reward (the first curve of its registry entry)."""
    from tunepipe.training import _headline

    clock = Clock(0.0)
    cb = ConsoleProgress("grpo", terminal=False, time_source=clock, shown=_headline("grpo"))
    _train(cb, clock, [(4.0, {"loss": 0.01, "reward": 0.4375, "num_input_tokens_seen": 400})], max_steps=2)
    assert capsys.readouterr().out.startswith("[grpo] step 1/2  loss 0.010  reward 0.438  100 tok/s")


def test_a_resumed_run_counts_from_its_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock(0.0)
    cb = ConsoleProgress("sft", terminal=False, time_source=clock)
    cb.on_train_begin(ARGS, _state(30, 40, tokens=90_000), None)
    clock.t += 5.0
    cb.on_step_end(ARGS, _state(31, 40), None)
    cb.on_log(ARGS, _state(31, 40), None, logs={"loss": 2.0, "num_input_tokens_seen": 95_000})
    assert capsys.readouterr().out == "[sft] step 31/40  loss 2.000  1,000 tok/s  ETA 0:00:45\n"


def test_only_the_main_process_prints(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RANK", "1")
    clock = Clock(0.0)
    cb = ConsoleProgress("sft", terminal=False, time_source=clock)
    _train(cb, clock, [(1.0, {"loss": 1.0})])
    assert capsys.readouterr().out == ""


def test_a_terminal_gets_a_progress_bar_with_the_latest_values_and_the_lines_above_it() -> None:
    from rich.console import Console

    screen = io.StringIO()
    clock = Clock(0.0)
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)
    cb = ConsoleProgress("sft", budget_end=600.0, terminal=True, console=console, time_source=clock)
    _train(
        cb,
        clock,
        [
            (3.0, {"loss": 1.5, "num_input_tokens_seen": 300}),
            (3.0, {"loss": 1.25, "num_input_tokens_seen": 600}),
        ],
    )
    assert cb._progress is not None  # drawn while training runs
    cb.on_train_end(ARGS, _state(2), None)
    assert cb._progress is None
    drawn = screen.getvalue()
    assert "[sft] step 1/4  loss 1.500  100 tok/s  ETA 0:00:09  budget left 0:09:57" in drawn
    assert "[sft] step 2/4  loss 1.250  100 tok/s  ETA 0:00:06  budget left 0:09:54" in drawn
    # The bar's last state: step 2 of 4 and the latest values.
    assert re.search(r"\[sft\] .*step 2/4 +loss 1\.250  100 tok/s  ETA 0:00:06", drawn)


def _stage_log(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def test_library_warnings_and_log_records_go_to_the_stage_log_not_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = logging.getLogger("transformers")
    default = logging.StreamHandler(sys.stderr)  # what transformers installs: its records on stderr
    hf.addHandler(default)
    loggers = [logging.getLogger(n) for n in ("transformers", "trl", "torch", "datasets", "tunepipe.trainer")]
    before = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    log_path = tmp_path / "sft.log"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            showwarning = warnings.showwarning
            with log_path.open("a") as fh, capture_library_output(fh, verbose=False):
                warnings.warn("console-test: a deprecated argument", FutureWarning, stacklevel=1)
                hf.warning("console-test: transformers says so")
                logging.getLogger("trl.trainer.sft_trainer").warning("console-test: trl says so")
                logging.getLogger("peft").info("console-test: below peft's level")  # not shown anywhere
            assert warnings.showwarning is showwarning
        assert capsys.readouterr().err == ""
        text = _stage_log(log_path)
        assert "FutureWarning: console-test: a deprecated argument" in text
        assert "WARNING transformers: console-test: transformers says so" in text
        assert "WARNING trl.trainer.sft_trainer: console-test: trl says so" in text
        assert "below peft's level" not in text
        assert re.match(r"\d\d:\d\d:\d\d ", text)  # stamped like the stage log's own lines
        # Put back as it was: the library prints again after the stage.
        assert [(lg.handlers, lg.propagate, lg.level) for lg in loggers] == before
        hf.warning("console-test: after the stage")
        assert "after the stage" in capsys.readouterr().err
    finally:
        hf.removeHandler(default)


def test_verbose_shows_them_on_the_terminal_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_path = tmp_path / "sft.log"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with log_path.open("a") as fh, capture_library_output(fh, verbose=True):
            warnings.warn("console-test: verbose warning", UserWarning, stacklevel=1)
            logging.getLogger("accelerate.utils").warning("console-test: verbose record")
    err = capsys.readouterr().err
    text = _stage_log(log_path)
    for needle in ("UserWarning: console-test: verbose warning", "console-test: verbose record"):
        assert needle in err and needle in text


def test_the_trainers_log_dicts_go_to_the_file_and_the_step_lines_to_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_path, shown = tmp_path / "sft.log", []
    clock = Clock(0.0)
    cb = ConsoleProgress("sft", terminal=False, time_source=clock)
    with log_path.open("a") as fh, capture_library_output(fh, verbose=True, echo=shown.append):
        _train(cb, clock, [(1.0, {"loss": 1.23456, "grad_norm": 0.5, "num_input_tokens_seen": 10})])
    out, text = capsys.readouterr().out, _stage_log(log_path)
    assert out == "[sft] step 1/4  loss 1.235  10 tok/s  ETA 0:00:03\n"
    assert "[sft] step 1 {'loss': 1.235, 'grad_norm': 0.5, 'num_input_tokens_seen': 10}" in text
    assert "[sft] step 1/4  loss 1.235" in text
    # --verbose echoes the dict; the step line is on stdout already, not twice.
    assert shown == ["[sft] step 1 {'loss': 1.235, 'grad_norm': 0.5, 'num_input_tokens_seen': 10}"]


def test_handlers_a_library_adds_or_owns_while_captured(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """transformers and datasets add their stderr handler when first imported (inside a stage); torch
    gives sub-loggers console handlers of their own, and a trace handler writing its own file."""
    datasets_log, torch_child, torch_trace = (
        logging.getLogger(n) for n in ("datasets", "torch.console_test", "torch.console_test_trace")
    )
    torch_console = logging.StreamHandler(sys.stderr)
    torch_child.addHandler(torch_console)
    torch_child.propagate = False
    trace_file = logging.FileHandler(tmp_path / "trace.log")
    torch_trace.addHandler(trace_file)
    torch_trace.propagate = False
    added = logging.StreamHandler(sys.stderr)
    log_path = tmp_path / "sft.log"
    try:
        with log_path.open("a") as fh, capture_library_output(fh):
            datasets_log.addHandler(added)  # while captured
            datasets_log.warning("console-test: datasets record")
            torch_child.warning("console-test: torch sub-logger record")
            torch_trace.warning("console-test: torch trace record")
        assert capsys.readouterr().err == ""
        text = _stage_log(log_path)
        assert "datasets record" in text and "torch sub-logger record" in text
        assert "trace record" not in text and "trace record" in (tmp_path / "trace.log").read_text()
        assert added in datasets_log.handlers and torch_child.handlers == [torch_console]
        datasets_log.warning("console-test: datasets after")
        assert "datasets after" in capsys.readouterr().err
    finally:
        datasets_log.removeHandler(added)
        torch_child.removeHandler(torch_console)
        torch_trace.removeHandler(trace_file)
        trace_file.close()


@pytest.mark.slow
def test_a_smoke_run_prints_one_line_per_step_and_keeps_library_output_in_the_log(
    tmp_path: Path, tiny_qwen3: Path
) -> None:
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        dpo={"enabled": False},
        eval={"models": ["base", "sft"]},
        hardware={"time_limit": "2h"},
    )
    r = tunepipe("run", cfg, "--smoke")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [line for line in r.stdout.splitlines() if line.startswith("[sft] step ")]
    assert [line.split()[2] for line in steps] == ["1/3", "2/3", "3/3"]  # smoke runs log every step
    shape = (
        r"\[sft\] step \d/3  loss \d+\.\d{3}  lr \S+  [\d,]+ tok/s  ETA \d:\d\d:\d\d  budget left 1:5\d:\d\d"
    )
    for line in steps:
        assert re.fullmatch(shape, line), line
    assert "{'loss'" not in r.stdout and "'grad_norm'" not in r.stdout  # no raw log dicts
    assert not re.search(r"\d+%\||it/s\]|█", r.stdout)  # no tqdm bar
    assert "\x1b[" not in r.stdout
    assert "Warning:" not in r.stdout + r.stderr
    assert "Loading weights" not in r.stderr  # the libraries' own bars are off while a stage runs
    log = (tmp_path / "runs" / "test-smoke" / "logs" / "sft.log").read_text()
    assert "'loss':" in log and "'grad_norm':" in log and "[sft] step 3/3" in log
    # transformers 5.x warns while the model loads (a FutureWarning): in the log, not on the terminal.
    assert re.search(r"\w+Warning: ", log)
