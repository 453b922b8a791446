"""The data stage on real files: accepted rows, rejected rows with file and line, and the stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from tunepipe.config import load_config
from tunepipe.data.prepare import DataError, prepare, write_prepared

GOOD = {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}


def _config(tmp_path: Path, model: Path, **data: object) -> Path:
    cfg = {
        "model": {"name_or_path": str(model)},
        "dpo": {"enabled": False},
        "eval": {"models": ["base", "sft"]},
        "data": {"sft": {"train": "sft.jsonl"}, **data},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _sft_file(tmp_path: Path) -> Path:
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD, GOOD])
    with path.open("a") as fh:
        fh.write('{"messages": [{"role": "user", "content": "x"}\n')  # line 3: broken JSON
        fh.write(
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
            )
            + "\n"
        )  # line 4
        fh.write("\n")  # line 5: blank lines are not rows
        fh.write(json.dumps({"prompt": "Add 1 and 1.", "completion": "2"}) + "\n")  # line 6
        fh.write(
            json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]})
            + "\n"
        )  # line 7
    return path


def test_rejects_carry_file_line_and_reason_and_nothing_is_lost(
    tmp_path: Path, tiny_tokenizer, tiny_qwen3
) -> None:
    src = _sft_file(tmp_path)
    cfg = load_config(_config(tmp_path, tiny_qwen3, max_bad_rows=5))
    prep = prepare(cfg, tiny_tokenizer, log=lambda _m: None)
    stats = write_prepared(prep, tmp_path / "out")

    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    by_line = {r["line"]: r for r in rejects}
    assert sorted(by_line) == [3, 4, 7]
    assert all(r["file"] == str(src) for r in rejects)
    assert "invalid JSON" in by_line[3]["reason"]
    assert "messages[1].role" in by_line[4]["reason"] and "'robot'" in by_line[4]["reason"]
    assert "empty assistant response" in by_line[7]["reason"]

    (source,) = stats["sources"]
    assert source["rows_in"] == 6 == source["rows_accepted"] + source["rows_rejected"]
    assert source["rows_accepted"] == 3 and stats["splits"]["sft_train"]["rows"] == 3
    assert set(source["format"].split(",")) == {"messages", "prompt_completion"}
    written = (tmp_path / "out" / "sft_train.jsonl").read_text().splitlines()
    assert len(written) == 3


def test_too_many_bad_rows_stops_with_the_lines(tmp_path: Path, tiny_tokenizer, tiny_qwen3) -> None:
    _sft_file(tmp_path)
    cfg = load_config(_config(tmp_path, tiny_qwen3, max_bad_rows=0))
    with pytest.raises(DataError) as err:
        prepare(cfg, tiny_tokenizer, log=lambda _m: None)
    msg = str(err.value)
    assert "3 of 6 rows rejected" in msg and "sft.jsonl:3:" in msg and "sft.jsonl:7:" in msg
    assert "data.max_bad_rows" in msg


def test_too_long_rows_are_dropped_and_counted(tmp_path: Path, tiny_tokenizer, tiny_qwen3) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    write_jsonl(tmp_path / "sft.jsonl", [GOOD, long])
    cfg = load_config(_config(tmp_path, tiny_qwen3, max_length=64, max_bad_rows=1))
    prep = prepare(cfg, tiny_tokenizer, log=lambda _m: None)
    assert [r["line"] for r in prep.rejects] == [2]
    assert "data.max_length 64" in prep.rejects[0]["reason"]


def test_missing_source_names_the_path(tmp_path: Path, tiny_tokenizer, tiny_qwen3) -> None:
    cfg = load_config(_config(tmp_path, tiny_qwen3))
    with pytest.raises(DataError, match="sft.jsonl"):
        prepare(cfg, tiny_tokenizer, log=lambda _m: None)


def test_preference_rows_are_pairs_with_a_shared_prompt(tmp_path: Path, tiny_tokenizer, tiny_qwen3) -> None:
    write_jsonl(tmp_path / "sft.jsonl", [GOOD])
    write_jsonl(
        tmp_path / "dpo.jsonl",
        [
            {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"},
            {
                "prompt": [{"role": "user", "content": "Add 1 and 1."}],
                "chosen": [{"role": "assistant", "content": "2"}],
                "rejected": [{"role": "assistant", "content": "3"}],
            },
            {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
        ],
    )
    p = _config(tmp_path, tiny_qwen3, dpo={"train": "dpo.jsonl"}, max_bad_rows=1)
    raw = yaml.safe_load(p.read_text())
    raw["dpo"] = {"enabled": True}
    raw["eval"] = {"models": ["base", "sft", "dpo"]}
    p.write_text(yaml.safe_dump(raw))
    prep = prepare(load_config(p), tiny_tokenizer, log=lambda _m: None)
    pairs = prep.splits["dpo_train"].rows
    assert len(pairs) == 2
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Add 2 and 3."}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "5"}]
    assert [(r["line"], "identical" in r["reason"]) for r in prep.rejects] == [(3, True)]


def test_prompt_rows_for_grpo_from_an_answer_column_or_the_last_assistant_turn() -> None:
    from tunepipe.data.formats import RowError
    from tunepipe.data.prepare import PROMPT_ANSWER, _to_prompt

    row = _to_prompt({"prompt": "What is 2 + 3?", "answer": 5}, PROMPT_ANSWER, {}, "GRPO")
    assert row["prompt"] == [{"role": "user", "content": "What is 2 + 3?"}] and row["answer"] == "5"
    assert row["messages"][-1] == {"role": "assistant", "content": "5"}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}]
    assert _to_prompt({"prompt": msgs, "answer": "5"}, PROMPT_ANSWER, {}, "GRPO")["prompt"] == msgs
    mapped = _to_prompt({"q": "1 + 1?", "a": "2"}, PROMPT_ANSWER, {"prompt": "q", "answer": "a"}, "GRPO")
    assert mapped["answer"] == "2" and mapped["prompt"][0]["content"] == "1 + 1?"
    conv = {"messages": [*msgs, {"role": "assistant", "content": "5"}]}
    assert _to_prompt(conv, "messages", {}, "GRPO") == {**row, "prompt": msgs, "messages": conv["messages"]}
    for bad, fmt, why in [
        ({"prompt": "x", "chosen": "a", "rejected": "b"}, "preference", "prompts need a reference answer"),
        ({"question": "x", "answer": "1"}, PROMPT_ANSWER, "no `prompt` next to `answer`"),
        ({"prompt": "x", "answer": ""}, PROMPT_ANSWER, "must be a non-empty text or number"),
        ({"prompt": [{"role": "robot", "content": "x"}], "answer": "1"}, PROMPT_ANSWER, "unknown role"),
    ]:
        with pytest.raises(RowError, match=why):
            _to_prompt(bad, fmt, {}, "GRPO")
