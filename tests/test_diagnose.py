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
