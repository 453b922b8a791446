"""KTO: unpaired feedback rows (prompt, one completion, a thumbs up or down), their detection and
checks, and real KTOTrainer runs on a tiny model: on unpaired rows, and on preference pairs split into
a desirable and an undesirable row."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_jsonl

from tunepipe.config import load_config
from tunepipe.data.formats import RowError, candidates, detect_format, to_unpaired
from tunepipe.data.prepare import DataError, prepare

U = {"role": "user"}
A = {"role": "assistant"}


def _msgs(*turns: tuple[dict, str]) -> list[dict]:
    return [{**role, "content": text} for role, text in turns]


# --------------------------------------------------------------------------- formats (no model)


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": _msgs((U, "2+2?")), "completion": _msgs((A, "4")), "label": False},
        {"messages": _msgs((U, "2+2?"), (A, "4")), "label": "yes"},
    ],
)
def test_unpaired_rows_are_detected(record: dict):
    assert candidates(record, {}) == ["unpaired"]
    assert detect_format([record], {}, "f.jsonl") == "unpaired"


def test_a_label_that_is_not_feedback_leaves_sft_data_alone():
    # A category column called `label` is not a thumbs up or down: the row stays a conversation.
    assert candidates({"prompt": "p", "completion": "c", "label": "math"}, {}) == ["prompt_completion"]
    assert candidates({"messages": _msgs((U, "p"), (A, "c")), "label": 3}, {}) == ["messages"]
    # Preference pairs stay preference pairs.
    assert candidates({"prompt": "p", "chosen": "a", "rejected": "b", "label": True}, {}) == ["preference"]


def test_a_mapped_label_column_is_detected_and_read():
    record = {"question": "hi", "answer": "hello", "thumbs": "down"}
    columns = {"prompt": "question", "completion": "answer", "label": "thumbs"}
    assert candidates(record, columns) == ["unpaired"]
    (row,) = to_unpaired(record, "unpaired", columns)
    assert row == {"prompt": _msgs((U, "hi")), "completion": _msgs((A, "hello")), "label": False}


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (1.0, True),
        ("TRUE", True),
        (" no ", False),
        ("up", True),
        ("down", False),
        ("1", True),
        ("0", False),
    ],
)
def test_accepted_label_values(value: Any, label: bool):
    (row,) = to_unpaired({"prompt": "p", "completion": "c", "label": value}, "unpaired", {})
    assert row["label"] is label


def test_unpaired_rows_become_conversational():
    rec = {"prompt": "2+2?", "completion": "4", "label": True, "system": "Be brief."}
    (row,) = to_unpaired(rec, "unpaired", {})
    assert row == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
        "label": True,
    }
    # messages: the last assistant turn is the completion, everything before it the prompt.
    conv = _msgs((U, "a"), (A, "b"), (U, "c"), (A, "d"))
    (row,) = to_unpaired({"messages": conv, "label": 0}, "unpaired", {})
    assert row["prompt"] == conv[:3] and row["completion"] == conv[3:] and row["label"] is False


def test_preference_pairs_split_into_a_desirable_and_an_undesirable_row():
    rows = to_unpaired({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "preference", {})
    assert rows == [
        {"prompt": _msgs((U, "2+2?")), "completion": _msgs((A, "4")), "label": True},
        {"prompt": _msgs((U, "2+2?")), "completion": _msgs((A, "5")), "label": False},
    ]
    implicit = {"chosen": _msgs((U, "q"), (A, "good")), "rejected": _msgs((U, "q"), (A, "bad"))}
    good, bad = to_unpaired(implicit, "preference_implicit", {})
    assert good["prompt"] == bad["prompt"] == _msgs((U, "q"))
    assert (good["completion"], good["label"], bad["completion"], bad["label"]) == (
        _msgs((A, "good")),
        True,
        _msgs((A, "bad")),
        False,
    )


@pytest.mark.parametrize(
    ("record", "fmt", "reason"),
    [
        (
            {"prompt": "p", "completion": "c"},
            "prompt_completion",
            "no `label`: unpaired feedback needs label true/false",
        ),
        ({"messages": _msgs((U, "p"), (A, "c"))}, "messages", "no `label`"),
        (
            {"prompt": "p", "completion": "c", "label": "maybe"},
            "unpaired",
            "label: 'maybe' is not a thumbs up or down",
        ),
        (
            {"prompt": "p", "completion": "c", "label": 0.5},
            "unpaired",
            "label: 0.5 is not a thumbs up or down",
        ),
        ({"prompt": "p", "completion": "c", "label": [True]}, "unpaired", "label: [True] is not"),
        (
            {"prompt": "p", "completion": " ", "label": True},
            "unpaired",
            "completion: empty assistant response",
        ),
        ({"messages": _msgs((U, "p")), "label": True}, "unpaired", "messages: no assistant turn"),
        (
            {"messages": _msgs((U, "p"), (A, "c"), (U, "more")), "label": True},
            "unpaired",
            "turns after the last assistant turn",
        ),
        ({"messages": _msgs((A, "c")), "label": True}, "unpaired", "no user turn before the completion"),
        ({"text": "t", "label": True}, "text", "a text row in unpaired feedback data"),
    ],
)
def test_bad_unpaired_rows_say_why(record: dict, fmt: str, reason: str):
    with pytest.raises(RowError) as e:
        to_unpaired(record, fmt, {})
    assert reason in str(e.value)


# --------------------------------------------------------------------------- through the data stage


def _config(folder: Path, model: Path, train: str, **kto: Any) -> Path:
    cfg = {
        "project": {"name": "kto", "output_dir": "runs/kto"},
        "model": {"name_or_path": str(model)},
        "pipeline": ["kto"],
        "data": {"kto": {"train": train}, "max_length": 96, "max_bad_rows": 1000},
        "kto": {
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_steps": 3,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            **kto,
        },
        "training": {"logging_steps": 1},
        "eval": {"models": ["base", "kto"]},
    }
    path = folder / "tunepipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


QA = [
    ("2+2?", "4", "5"),
    ("Capital of France?", "Paris", "Rome"),
    ("3*3?", "9", "6"),
    ("Hi!", "Hello!", "Go away."),
]
FEEDBACK = [
    r
    for q, good, bad in QA
    for r in (
        {"prompt": q, "completion": good, "label": True},
        {"prompt": q, "completion": bad, "label": False},
    )
]
PAIRS = [{"prompt": q, "chosen": good, "rejected": bad} for q, good, bad in QA]


def test_the_data_stage_rejects_bad_feedback_rows_with_file_and_line(
    tmp_path: Path, tiny_qwen3: Path, tiny_tokenizer
):
    bad = [
        {"prompt": "q", "completion": "c"},  # line 2: no label
        {"prompt": "q", "completion": "c", "label": "maybe"},  # line 3
        {"prompt": "q", "completion": "c", "label": 0.5},  # line 4
    ]
    data = write_jsonl(tmp_path / "fb.jsonl", [FEEDBACK[0], *bad, FEEDBACK[1]])
    prep = prepare(load_config(_config(tmp_path, tiny_qwen3, str(data))), tiny_tokenizer, log=lambda _m: None)
    rows = prep.splits["kto_train"].rows
    assert [r["label"] for r in rows] == [True, False]
    assert rows[0]["prompt"] == _msgs((U, "2+2?")) and rows[0]["completion"] == _msgs((A, "4"))
    reasons = {r["line"]: r["reason"] for r in prep.rejects}
    assert {r["file"] for r in prep.rejects} == {str(data)}
    assert sorted(reasons) == [2, 3, 4]
    assert "no `label`" in reasons[2]
    assert "'maybe' is not a thumbs up or down" in reasons[3]
    assert "0.5 is not a thumbs up or down" in reasons[4]

    # Nothing usable: the error quotes file:line and the reason.
    only_bad = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError) as e:
        prepare(
            load_config(_config(tmp_path, tiny_qwen3, str(only_bad))), tiny_tokenizer, log=lambda _m: None
        )
    assert f"{only_bad}:1: no `label`" in str(e.value)
    assert f"{only_bad}:2: label: 'maybe' is not a thumbs up or down" in str(e.value)


def test_the_data_stage_splits_preference_pairs_for_kto(tmp_path: Path, tiny_qwen3: Path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    prep = prepare(load_config(_config(tmp_path, tiny_qwen3, str(data))), tiny_tokenizer, log=lambda _m: None)
    rows = prep.splits["kto_train"].rows
    assert [r["label"] for r in rows] == [True, False] * len(PAIRS)
    assert [r["completion"][0]["content"] for r in rows[:2]] == ["4", "5"]


# --------------------------------------------------------------------------- training


def _train(tmp_path: Path, model: Path, rows: list[dict]) -> Path:
    from tunepipe.pipeline import run_pipeline

    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_config(_config(tmp_path, model, str(data)))
    outcome = run_pipeline(cfg, stages=["data", "kto"], echo=lambda _m: None)
    assert outcome == {"data": "done", "kto": "done"}, outcome
    return tmp_path / "runs" / "kto"


def _check_trained(run: Path) -> list[dict]:
    from safetensors.torch import load_file

    log = [json.loads(x) for x in (run / "kto" / "log.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log)
    # TRL's KTO metrics reach the log (the stage's curves read them).
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert all(key in r for r in log), (key, log[0])
    assert any("rewards/margins" in r for r in log)
    # LoRA's B matrices start at zero: trained ones are not.
    weights = load_file(str(run / "kto" / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)
    stage = json.loads((run / "kto" / "stage.json").read_text())
    assert stage["status"] == "done", stage
    return log


@pytest.mark.slow
def test_kto_trains_on_unpaired_feedback(tmp_path: Path, tiny_qwen3: Path):
    run = _train(tmp_path, tiny_qwen3, FEEDBACK)
    _check_trained(run)
    stage = json.loads((run / "kto" / "stage.json").read_text())
    assert stage["outputs"]["reference"] == "adapter"
    assert (stage["outputs"]["desirable"], stage["outputs"]["undesirable"]) == (4, 4)


@pytest.mark.slow
def test_kto_trains_on_split_preference_pairs(tmp_path: Path, tiny_qwen3: Path):
    run = _train(tmp_path, tiny_qwen3, PAIRS)
    _check_trained(run)
