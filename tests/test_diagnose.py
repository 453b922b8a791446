"""`tunepipe diagnose`: every known issue is recognised in its fixture, in noisy variants of it
(torchrun rank prefixes with interleaved ranks, ANSI colours, a cut-off head) and in real logs
posted in public issue trackers (tests/fixtures/diagnose/real, each with its source URL)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunepipe.diagnose import (
    Diagnosis,
    diagnose_text,
    diagnosis_json,
    format_diagnosis,
    load_knowledge,
    parse_log,
)

FIXTURES = Path(__file__).parent / "fixtures" / "diagnose"
KB = load_knowledge()
KB_IDS = {e.id for e in KB}
FIXTURE_FILES = sorted(FIXTURES.glob("*.log"))
REAL_FILES = sorted((FIXTURES / "real").glob("*.log"))


def expected_id(path: Path) -> str:
    """<id>.log or <id>-<n>.log -> id."""
    return path.stem if path.stem in KB_IDS else re.sub(r"-\d+$", "", path.stem)


def fixture_ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(FIXTURES).as_posix() for p in paths]


# --------------------------------------------------------------------------- noisy variants


def with_ranks(text: str, ranks: tuple[int, ...] = (0, 1)) -> str:
    """Both ranks print the same log, line by line interleaved, as torchrun's `[rankN]:` prefix shows it,
    with a c10d warning line in between."""
    lines = text.rstrip("\n").splitlines()
    out = []
    for i, line in enumerate(lines):
        for r in ranks:
            out.append(f"[rank{r}]: {line}")
        if i == 1:
            out.append("[W1206 18:44:12.715298746 socket.cpp:752] [c10d] The client socket has timed out.")
    return "\n".join(out) + "\n"


def with_prefix(text: str, prefix: str) -> str:
    return "".join(f"{prefix}{line}\n" for line in text.splitlines())


def with_ansi(text: str) -> str:
    """Colours as rich/loguru print them: exception names red, paths dim, the header bold."""
    text = re.sub(r"^(\w[\w.]*(?:Error|Exception)\w*)", "\x1b[31;1m\\1\x1b[0m", text, flags=re.M)
    text = text.replace(
        "Traceback (most recent call last):", "\x1b[1mTraceback (most recent call last):\x1b[0m"
    )
    return re.sub(r'File "([^"]+)"', 'File "\x1b[2m\\1\x1b[0m"', text)


def without_head(text: str) -> str:
    """A paste that starts in the middle of the traceback: header and the first frame are gone."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line)
    except StopIteration:
        return text
    return "\n".join(lines[:start] + lines[start + 3 :]) + "\n"


# --------------------------------------------------------------------------- knowledge base


def test_knowledge_base_is_complete_and_well_formed() -> None:
    assert len(KB) >= 40
    for e in KB:
        assert re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", e.id), e.id
        assert e.cause and len(e.cause) > 40, e.id
        assert e.fix, e.id
        # Fixes are concrete: at least one step names a config key or a command in backticks.
        assert any("`" in step for step in e.fix), e.id
        assert 0 < e.confidence <= 1, e.id


def test_every_entry_has_a_fixture() -> None:
    covered = {expected_id(p) for p in FIXTURE_FILES}
    assert KB_IDS - covered == set(), "entries without a log fixture"
    assert covered - KB_IDS == set(), "fixtures named after no entry"


def test_knowledge_loader_rejects_broken_entries(tmp_path: Path) -> None:
    entry = "- {id: a-b, title: t, patterns: ['x('], cause: c, fix: ['`x`']}\n"
    bad = tmp_path / "kb.yaml"
    bad.write_text(entry)
    with pytest.raises(ValueError, match="bad pattern"):
        load_knowledge(bad)
    bad.write_text("- {id: a-b, title: t, patterns: [x], cause: c, fix: [y]}\n" * 2)
    with pytest.raises(ValueError, match="duplicate id"):
        load_knowledge(bad)
    bad.write_text("- {id: A_b, title: t, patterns: [x], cause: c, fix: [y]}\n")
    with pytest.raises(ValueError, match="kebab-case"):
        load_knowledge(bad)


# --------------------------------------------------------------------------- fixtures and variants


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=fixture_ids(FIXTURE_FILES))
def test_fixture_is_diagnosed(path: Path) -> None:
    d = diagnose_text(path.read_text())
    assert d.id == expected_id(path), format_diagnosis(d)
    assert d.confidence >= 0.5
    assert d.fix and d.cause
    if "Traceback (most recent call last)" in path.read_text():
        assert d.where["exception"] or d.where["raised_in"], d.where


VARIANTS = {
    "ranks": with_ranks,
    "default-prefix": lambda t: with_prefix(t, "[default1]:"),
    "srun-prefix": lambda t: with_prefix(t, "3: "),
    "ansi": with_ansi,
    "no-head": without_head,
    "ansi+ranks+no-head": lambda t: with_ranks(with_ansi(without_head(t)), (1, 0)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("path", FIXTURE_FILES, ids=fixture_ids(FIXTURE_FILES))
def test_noisy_variant_is_diagnosed(path: Path, variant: str) -> None:
    d = diagnose_text(VARIANTS[variant](path.read_text()))
    assert d.id == expected_id(path), f"{variant}\n{format_diagnosis(d)}"


def test_interleaved_ranks_keep_each_traceback_whole() -> None:
    text = with_ranks((FIXTURES / "cuda-oom-train.log").read_text())
    chains = parse_log(text).chains
    assert {c.exceptions[-1].rank for c in chains} == {0, 1}
    for c in chains:  # the rank's own frames only, in order, none borrowed from the other rank
        assert [f.function for f in c.exceptions[-1].frames][:2] == ["run", "_run_stage"]
        assert len(c.exceptions[-1].frames) == 8


@pytest.mark.parametrize("path", REAL_FILES, ids=fixture_ids(REAL_FILES))
def test_real_log_is_diagnosed(path: Path) -> None:
    text = path.read_text()
    first = text.splitlines()[0]
    assert re.fullmatch(r"# source: https://github\.com/[\w.-]+/[\w.-]+/(?:issues|pull)/\d+", first), first
    d = diagnose_text(text)
    assert d.id == expected_id(path), format_diagnosis(d)


def test_enough_real_logs() -> None:
    assert len(REAL_FILES) >= 10
    assert len({expected_id(p) for p in REAL_FILES}) >= 10


# --------------------------------------------------------------------------- where, chains, ranks


def test_where_points_at_project_code_and_the_raising_library_frame() -> None:
    d = diagnose_text((FIXTURES / "cuda-oom-train.log").read_text())
    # tunepipe's own code counts as project code even when installed in site-packages.
    assert d.where["frame"] == "tunepipe/training.py:206 in train"
    assert d.where["raised_in"] == "torch/optim/adamw.py:127 in _init_group"
    assert d.where["exception"].startswith("torch.OutOfMemoryError: CUDA out of memory")


def test_user_script_frame_is_found_under_library_frames() -> None:
    d = diagnose_text((FIXTURES / "chat-template-missing.log").read_text())
    assert d.where["frame"] == "/home/alice/llm/train_sft.py:40 in formatting"
    assert d.where["raised_in"] == "transformers/tokenization_utils_base.py:3384 in get_chat_template"


def test_chained_exception_prefers_the_root_cause() -> None:
    d = diagnose_text((FIXTURES / "datasets-cast-error.log").read_text())
    assert d.id == "datasets-cast-error"
    assert d.where["exception"].startswith("TypeError: Couldn't cast array of type")
    # The root traceback has only library frames; the user frame comes from the outer one.
    assert d.where["frame"] == "/home/alice/llm/train_sft.py:15 in <module>"


def test_child_failed_summary_points_at_the_failing_rank() -> None:
    oom = (FIXTURES / "cuda-oom-train.log").read_text()
    timeout = (
        "Traceback (most recent call last):\n"
        '  File "/home/alice/.venv/lib/python3.11/site-packages/torch/distributed/c10d.py", line 9, in f\n'
        "    work.wait()\n"
        "torch.distributed.DistBackendError: [Rank 0] Watchdog caught collective operation timeout: "
        "WorkNCCL(SeqNum=7, OpType=ALLREDUCE) ran for 600061 milliseconds before timing out.\n"
    )
    summary = (
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "============================================================\n"
        "tunepipe FAILED\n"
        "------------------------------------------------------------\n"
        "Root Cause (first observed failure):\n"
        "[0]:\n"
        "  time      : 2025-03-02_10:14:05\n"
        "  host      : gpu-node-07\n"
        "  rank      : 1 (local_rank: 1)\n"
        "  exitcode  : 1 (pid: 41234)\n"
        "============================================================\n"
    )
    log = with_prefix(timeout, "[rank0]: ") + with_prefix(oom, "[rank1]: ") + summary
    assert parse_log(log).root_rank == 1
    d = diagnose_text(log)
    assert (d.id, d.rank) == ("cuda-oom-train", 1)


def test_symptom_on_one_rank_does_not_hide_the_error_on_another() -> None:
    """NCCL timeouts on the waiting ranks are a symptom; the crashed rank's error is the cause."""
    log = (FIXTURES / "nccl-timeout.log").read_text() + with_prefix(
        (FIXTURES / "data-missing-column.log").read_text(), "[rank0]: "
    )
    assert diagnose_text(log).id == "data-missing-column"


def test_eval_oom_is_told_apart_from_training_oom() -> None:
    assert diagnose_text((FIXTURES / "cuda-oom-eval.log").read_text()).id == "cuda-oom-eval"
    assert diagnose_text((FIXTURES / "cuda-oom-train.log").read_text()).id == "cuda-oom-train"


def test_placeholders_are_filled_from_the_log() -> None:
    d = diagnose_text((FIXTURES / "data-missing-column.log").read_text())
    assert "'messages'" in d.title and "${" not in d.cause + " ".join(d.fix)
    d = diagnose_text((FIXTURES / "import-name-missing.log").read_text())
    assert "is_wandb_available" in d.title and "transformers" in d.title


def test_tunepipe_unexpected_error_summary_is_read() -> None:
    log = (
        "unexpected error: KeyError: 'chosen'\n"
        "  at /home/alice/llm/.venv/lib/python3.11/site-packages/tunepipe/stages/dpo.py:88 in run\n"
        "  the full traceback is in <output_dir>/logs/<stage>.log\n"
    )
    d = diagnose_text(log)
    assert d.id == "data-missing-column"
    assert d.where["frame"] == "tunepipe/stages/dpo.py:88 in run"


# --------------------------------------------------------------------------- unknown errors and output


def test_unknown_error_still_says_where() -> None:
    log = (
        "Traceback (most recent call last):\n"
        '  File "/home/alice/llm/train_sft.py", line 12, in <module>\n'
        "    main()\n"
        '  File "/home/alice/llm/train_sft.py", line 9, in main\n'
        "    ratio = hits / total\n"
        "ZeroDivisionError: division by zero\n"
    )
    d = diagnose_text(log)
    assert d.id is None and d.confidence == 0.0
    assert d.where == {
        "frame": "/home/alice/llm/train_sft.py:9 in main",
        "raised_in": None,
        "exception": "ZeroDivisionError: division by zero",
    }
    assert "No known issue" in d.cause
    assert "unknown error" in format_diagnosis(d)


def test_log_without_an_error() -> None:
    d = diagnose_text("{'loss': 1.2, 'epoch': 0.5}\ntraining finished\n")
    assert d.id is None
    assert d.where == {"frame": None, "raised_in": None, "exception": None}
    assert "No exception was found" in d.cause


def test_text_output_has_where_cause_fix() -> None:
    d = diagnose_text(with_ranks((FIXTURES / "bnb-wrong-device.log").read_text()))
    text = format_diagnosis(d)
    assert text.startswith("diagnosis: bnb-wrong-device: ")
    for heading in ("\nWhere\n", "\nCause\n", "\nFix\n"):
        assert heading in text
    assert "  rank:" in text and "  1. " in text


def test_json_output_shape() -> None:
    d = diagnose_text((FIXTURES / "pad-token-missing.log").read_text())
    out = diagnosis_json(d)
    assert set(out) == {"id", "title", "where", "cause", "fix", "confidence"}
    assert set(out["where"]) == {"frame", "raised_in", "exception", "rank"}
    assert out["id"] == "pad-token-missing" and isinstance(out["fix"], list)
    assert isinstance(d, Diagnosis)


# --------------------------------------------------------------------------- corrupt checkpoints


CORRUPT_CHECKPOINT_LOGS = {
    # The stage logs of a resume from a checkpoint with a garbage optimizer.pt, a cut trainer_state.json
    # and a cut adapter_model.safetensors (tunepipe before it checked checkpoints; torch 2.13).
    "optimizer.pt": "checkpoint-corrupt.log",
    "trainer_state.json": "checkpoint-corrupt-2.log",
    "adapter_model.safetensors": "checkpoint-corrupt-3.log",
}


@pytest.mark.parametrize("broken", list(CORRUPT_CHECKPOINT_LOGS))
def test_a_corrupt_checkpoint_file_is_not_a_weights_only_or_data_problem(broken: str) -> None:
    d = diagnose_text((FIXTURES / CORRUPT_CHECKPOINT_LOGS[broken]).read_text())
    assert d.id == "checkpoint-corrupt", format_diagnosis(d)
    advice = " ".join(d.fix)
    assert "weights_only=False" not in advice  # unpickling garbage can run code, and would not help
    assert "corrupt-checkpoint-N" in advice and "checkpoint-6" in advice  # the folder the log resumed


def test_a_corrupt_checkpoint_is_named_from_the_log() -> None:
    d = diagnose_text((FIXTURES / "checkpoint-corrupt-5.log").read_text())
    assert d.id == "checkpoint-corrupt"
    assert (
        d.fix[0]
        == "The file that cannot be read is `/scratch/carol/runs/llama-sft/checkpoint-500/optimizer.pt`."
    )
    assert d.fix[1].startswith("Move `/scratch/carol/runs/llama-sft/checkpoint-500` aside")
    d = diagnose_text((FIXTURES / "checkpoint-corrupt-4.log").read_text())  # only the folder is named
    assert d.fix[0].startswith("Move `outputs/run3/checkpoint-1500` aside")


def test_garbage_read_with_weights_only_is_not_the_weights_only_change() -> None:
    """torch wraps any unpickling error in its weights_only message; for garbage the detail after the
    blank line is an opcode, for the real torch 2.6 change it is an unsupported global."""
    summary = (
        "unexpected error: UnpicklingError: Weights only load failed. In PyTorch 2.6, we changed the default "
        "value of the `weights_only` argument in `torch.load` from `False` to `True`.\n"
        "Please file an issue with the following so that we can make `weights_only=True` compatible with "
        "your use case: WeightsUnpickler error: \n"
        "\n"
        "Unsupported operand 94\n"
        "\n"
        "Check the documentation of torch.load to learn more.\n"
        "  at /home/alice/llm/.venv/lib/python3.11/site-packages/tunepipe/training.py:262 in _run\n"
    )
    d = diagnose_text(summary)
    assert d.id == "safetensors-corrupt" and "weights_only=False" not in " ".join(d.fix), format_diagnosis(d)
    real = diagnose_text((FIXTURES / "torch-load-weights-only.log").read_text())
    assert real.id == "torch-load-weights-only"
    assert any("add_safe_globals" in step for step in real.fix)
    for step in real.fix:  # weights_only=False only ever with the condition that the file is trusted
        assert "weights_only=False" not in step or "only for a file you made or fully trust" in step


def test_patterns_take_only_known_kinds(tmp_path: Path) -> None:
    bad = tmp_path / "kb.yaml"
    bad.write_text("- {id: a-b, title: t, patterns: {any: [x], capure: [y]}, cause: c, fix: ['`x`']}\n")
    with pytest.raises(ValueError, match="patterns takes any, all, none and capture"):
        load_knowledge(bad)


# --------------------------------------------------------------------------- tunepipe's own errors


SITE = "/home/alice/llm/.venv/lib/python3.11/site-packages"
OWN_ERRORS = {
    # The CLI's line for bad config (a ConfigError), wrapped by the terminal.
    "cli-config": (
        "error: tunepipe.yaml: sft.learning_rate: Input should be a valid number, unable to parse\n"
        "string as a number (got 'fast'). Fix the value in tunepipe.yaml or override it with\n"
        "sft.learning_rate=1e-4\n",
        "tunepipe.yaml: sft.learning_rate: Input should be a valid number, unable to parse string as a "
        "number (got 'fast'). Fix the value in tunepipe.yaml or override it with sft.learning_rate=1e-4",
        "Fix the value in tunepipe.yaml or override it with sft.learning_rate=1e-4",
        2,
    ),
    # A traceback in logs/<stage>.log, with the next log record right after it.
    "traceback-config": (
        "Traceback (most recent call last):\n"
        f'  File "{SITE}/tunepipe/pipeline.py", line 398, in _run_stage\n'
        "    result: StageResult = module.run(ctx)\n"
        "tunepipe.config.ConfigError: tunepipe.yaml: data.max_length must be at least 16; "
        "set data.max_length: 512\n"
        "21:14:17 [sft] failed\n",
        "tunepipe.yaml: data.max_length must be at least 16; set data.max_length: 512",
        "Set data.max_length: 512",
        2,
    ),
    "bare-data": (
        "DataError: data/train.jsonl:3: role 'bot' is not one of system, user, assistant, tool; "
        "rename it with `columns:` or fix the row\n",
        "data/train.jsonl:3: role 'bot' is not one of system, user, assistant, tool; rename it with "
        "`columns:` or fix the row",
        "Rename it with `columns:` or fix the row",
        2,
    ),
    # Printed after a progress bar that ended without a newline.
    "after-progress-bar": (
        " 50%|█████     | 4/8 [00:01<00:01,  3.1it/s]error: --stage 'ppo': choose sft or dpo\n",
        "--stage 'ppo': choose sft or dpo",
        "Choose sft or dpo",
        2,
    ),
    "unexpected-own": (
        "unexpected error: PlannerError: hardware.gpu_memory_gb is not set and no GPU is visible: "
        "set hardware.gpu_memory_gb to plan for a target machine\n"
        f"  at {SITE}/tunepipe/planner.py:140 in starting_batch\n"
        "  the full traceback is in <output_dir>/logs/<stage>.log, the diagnosis in "
        "logs/<stage>.diagnosis.txt; or paste any log into `tunepipe diagnose -`\n",
        "hardware.gpu_memory_gb is not set and no GPU is visible: set hardware.gpu_memory_gb to plan "
        "for a target machine",
        "Set hardware.gpu_memory_gb to plan for a target machine",
        1,
    ),
}


@pytest.mark.parametrize("case", list(OWN_ERRORS))
def test_tunepipe_own_errors_are_reported_as_their_message(case: str) -> None:
    log, cause, fix, code = OWN_ERRORS[case]
    d = diagnose_text(log)
    assert d.id == "tunepipe-message", format_diagnosis(d)
    assert d.cause == cause
    assert d.title.endswith(f"(exit {code})") and d.confidence >= 0.9
    assert d.fix[0] == fix and d.fix[-1].startswith(f"Exit code {code} means")


def test_tunepipe_own_error_with_a_known_issue_puts_its_instruction_first() -> None:
    d = diagnose_text(
        " 75%|███████▌  | 6/8 [00:00<00:00, 13.94it/s]gate failed: [sft] needs stage 'data' to be "
        "done and up to date first: run `tunepipe run tunepipe.yaml` (or the 'data' stage)\n"
    )
    assert d.id == "tunepipe-gate-failed"
    assert d.fix[0] == "Run `tunepipe run tunepipe.yaml` (or the 'data' stage)"
    assert d.where["exception"].startswith("tunepipe.GateFailed: [sft] needs stage 'data'")


def test_own_exceptions_are_read_without_a_traceback_and_their_exit_code_explained() -> None:
    """Often only the last line is pasted: tunepipe's own classes count without an Error suffix."""
    d = diagnose_text(
        "tunepipe.stages.StageStopped: [dpo] stopped (signal SIGTERM); run the same command again\n"
    )
    assert (d.id, d.title) == (
        "tunepipe-message",
        "tunepipe's own error: stopped with a checkpoint saved (exit 75)",
    )
    assert d.fix == [
        "Run the same command again",
        "Exit code 75 means tunepipe stopped early with a complete checkpoint (time budget or a signal): "
        "nothing is broken; run the same command again to resume.",
    ]
    d = diagnose_text(
        "GateFailed: [eval] win_rate 0.31 < 0.5; lower eval.gate.min_win_rate or train longer\n"
    )
    assert (d.id, d.title) == ("tunepipe-message", "tunepipe's own error: a stage gate failed (exit 3)")
    assert d.fix[0] == "Lower eval.gate.min_win_rate or train longer"
    # A known issue still wins, and tunepipe's own instruction comes first among its steps.
    d = diagnose_text(
        "OutOfMemory: [sft] out of memory at step 4 even with micro-batch 1. Options: method: qlora "
        "(model.load_in_4bit: true), a shorter data.max_length\n"
    )
    assert d.id == "cuda-oom-train"
    assert d.fix[0] == "Options: method: qlora (model.load_in_4bit: true), a shorter data.max_length"


def test_other_tools_error_lines_are_not_tunepipe_messages() -> None:
    d = diagnose_text("  error: subprocess-exited-with-error\n\nerror: metadata-generation-failed\n")
    assert d.id != "tunepipe-message"
    d = diagnose_text("foo.ConfigError: a library's class of the same name\n")
    assert d.id != "tunepipe-message"
