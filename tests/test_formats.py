"""Every supported source type and record format, converted to one internal form; each reject reason
reported with its exact line (or record index); ambiguous or unknown formats explained."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_jsonl

from tunepipe.config import load_config
from tunepipe.data.prepare import DataError, prepare

A = {"role": "assistant"}


def _prepare(tmp_path: Path, model: Path, tok: Any, sft: Any = None, dpo: Any = None, **data: Any):
    cfg: dict[str, Any] = {"model": {"name_or_path": str(model)}, "data": {"max_bad_rows": 1000, **data}}
    cfg["data"]["sft"] = {"train": sft or "unused.jsonl"}
    if dpo is None:
        cfg["dpo"] = {"enabled": False}
        cfg["eval"] = {"models": ["base", "sft"]}
    else:
        cfg["data"]["dpo"] = {"train": dpo}
    if sft is None:
        write_jsonl(tmp_path / "unused.jsonl", [{"prompt": "p", "completion": "c"}])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return prepare(load_config(path), tok, log=lambda _m: None)


def _convs(prep, split: str = "sft_train") -> list:
    return [r.get("messages") for r in prep.splits[split].rows]


def _reasons(prep) -> dict[int, str]:
    return {r["line"]: r["reason"] for r in prep.rejects}


def _invariant(prep) -> None:
    for s in prep.sources:
        assert s["rows_in"] == s["rows_accepted"] + s["rows_rejected"], s


# ---------------------------------------------------------------- source types


def test_json_array_and_object_with_a_list(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    rec = {"prompt": "Hi", "completion": "Hello"}
    (tmp_path / "a.json").write_text(json.dumps([rec, "oops", rec]))
    (tmp_path / "b.json").write_text(json.dumps({"version": 1, "data": [rec]}))
    prep = _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft=["a.json", "b.json"])
    assert len(_convs(prep)) == 3
    assert [(r["file"].endswith("a.json"), r["line"]) for r in prep.rejects] == [(True, 2)]
    assert "not an object" in prep.rejects[0]["reason"]
    _invariant(prep)


def test_csv_with_column_mapping_and_bad_rows(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    with (tmp_path / "qa.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer", "source"])
        w.writerow(["What is 2 + 2?", "4", "x"])  # line 2
        w.writerow(["Multi\nline question?", "yes", "x"])  # lines 3-4
        w.writerow(["too", "many", "fields", "here"])  # line 5
        w.writerow(["Empty answer?", "", "x"])  # line 6
    src = {"path": "qa.csv", "columns": {"prompt": "question", "response": "answer"}}
    prep = _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft=[src])
    assert _convs(prep)[0] == [{"role": "user", "content": "What is 2 + 2?"}, {**A, "content": "4"}]
    assert _convs(prep)[1][0]["content"] == "Multi\nline question?"
    reasons = _reasons(prep)
    assert sorted(reasons) == [5, 6]
    assert "4 fields, the header has 3" in reasons[5] and "answer: empty assistant response" in reasons[6]
    assert prep.sources[0]["format"] == "prompt_completion"
    _invariant(prep)


def test_tsv_parquet_folder_glob_and_saved_dataset(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t.tsv").write_text("instruction\toutput\nSay hi\thi\n")
    pq.write_table(pa.Table.from_pylist([{"text": "plain text one"}, {"text": ""}]), tmp_path / "p.parquet")
    write_jsonl(tmp_path / "dir" / "x.jsonl", [{"prompt": "a", "completion": "b"}])
    write_jsonl(tmp_path / "dir" / "sub" / "y.jsonl", [{"prompt": "c", "completion": "d"}])
    datasets.Dataset.from_list([{"prompt": "e", "completion": "f"}]).save_to_disk(str(tmp_path / "saved"))
    # A saved dataset inside a data folder is read as a dataset, not as its loose .json metadata files.
    datasets.Dataset.from_list([{"prompt": "g", "completion": "h"}]).save_to_disk(
        str(tmp_path / "dir" / "ds")
    )
    prep = _prepare(
        tmp_path,
        tiny_qwen3,
        tiny_tokenizer,
        sft=["t.tsv", "p.parquet", "dir", "dir/**/*.jsonl", "saved"],
    )
    formats = [(Path(s["file"]).name, s["format"], s["rows_in"]) for s in prep.sources]
    assert formats == [
        ("t.tsv", "alpaca", 1),
        ("p.parquet", "text", 2),
        ("ds", "prompt_completion", 1),  # in path order: dir/ds < dir/sub/y.jsonl < dir/x.jsonl
        ("y.jsonl", "prompt_completion", 1),
        ("x.jsonl", "prompt_completion", 1),
        ("y.jsonl", "prompt_completion", 1),
        ("x.jsonl", "prompt_completion", 1),
        ("saved", "prompt_completion", 1),
    ]
    # The empty text is record 2 of the parquet file.
    assert [(Path(r["file"]).name, r["line"], r["reason"]) for r in prep.rejects] == [
        ("p.parquet", 2, "text: empty text")
    ]
    text_row = next(r for r in prep.splits["sft_train"].rows if "messages" not in r)
    assert text_row["labels"] == text_row["input_ids"]  # language modelling trains every token
    assert text_row["input_ids"][-1] == tiny_tokenizer.eos_token_id
    _invariant(prep)


def test_hub_id_offline_names_the_id_and_the_fix(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="someorg/some-dataset")
    msg = str(err.value)
    assert "'someorg/some-dataset'" in msg and "offline" in msg
    assert "save_to_disk" in msg and "path:" in msg


# ---------------------------------------------------------------- SFT formats


def test_alpaca_with_system_and_history(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    write_jsonl(
        tmp_path / "al.jsonl",
        [
            {
                "instruction": "Translate",
                "input": "chat",
                "output": "cat",
                "system": "Be terse.",
                "history": [["Hi", "Hello"]],
            },
            {"instruction": "No output here"},
        ],
    )
    prep = _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="al.jsonl")
    assert _convs(prep) == [
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {**A, "content": "Hello"},
            {"role": "user", "content": "Translate\n\nchat"},
            {**A, "content": "cat"},
        ]
    ]
    assert _reasons(prep) == {2: "missing field 'output'"}


def test_sharegpt_roles_and_system_field(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    write_jsonl(
        tmp_path / "sg.jsonl",
        [
            {
                "system": "You call tools.",
                "conversations": [
                    {"from": "human", "value": "Weather?"},
                    {"from": "function_call", "value": '{"name": "w"}'},
                    {"from": "observation", "value": "sunny"},
                    {"from": "gpt", "value": "It is sunny."},
                ],
            },
            {"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]},
            {"conversations": [{"from": "human", "value": "only a question"}]},
        ],
    )
    prep = _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="sg.jsonl")
    assert [m["role"] for m in _convs(prep)[0]] == ["system", "user", "assistant", "tool", "assistant"]
    reasons = _reasons(prep)
    assert "conversations[1].from: unknown role 'robot'" in reasons[2]
    assert reasons[3] == "no assistant turn: nothing to train on"


def test_openai_messages_with_tool_role_and_reasoning(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"x": 1}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4", "reasoning_content": "easy"},
    ]
    write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"messages": msgs},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        ],
    )
    prep = _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="m.jsonl")
    (conv,) = _convs(prep)
    assert conv[1]["tool_calls"] == [{"x": 1}] and conv[3]["reasoning_content"] == "easy"
    assert _reasons(prep) == {2: "messages[1].content: empty assistant response"}


def test_prompt_completion_as_message_lists(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    write_jsonl(
        tmp_path / "pc.jsonl",
        [
            {
                "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                "completion": [{"role": "assistant", "content": "C"}],
            },
        ],
    )
    prep = _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="pc.jsonl")
    assert [m["content"] for m in _convs(prep)[0]] == ["S", "U", "C"]


def test_ambiguous_detection_lists_columns_and_choices(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    write_jsonl(
        tmp_path / "amb.jsonl", [{"prompt": "a", "completion": "b", "instruction": "c", "output": "d"}]
    )
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="amb.jsonl")
    msg = str(err.value)
    assert "amb.jsonl" in msg and "ambiguous" in msg
    assert "['completion', 'instruction', 'output', 'prompt']" in msg
    assert "format: alpaca" in msg and "format: prompt_completion" in msg
    # Naming the format resolves it.
    prep = _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft=[{"path": "amb.jsonl", "format": "alpaca"}])
    assert _convs(prep)[0][-1]["content"] == "d"


def test_unknown_format_suggests_columns(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    write_jsonl(tmp_path / "u.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(DataError, match=r"unknown data format: the columns are \['a', 'q'\].*columns:"):
        _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="u.jsonl")


# ---------------------------------------------------------------- preference formats


def test_preference_formats(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    u = {"role": "user", "content": "Pick"}
    write_jsonl(
        tmp_path / "explicit.jsonl",
        [
            {"prompt": "Pick", "chosen": "good", "rejected": "bad"},
            {"prompt": [u], "chosen": [{**A, "content": "good"}], "rejected": [{**A, "content": "good"}]},
        ],
    )
    write_jsonl(
        tmp_path / "implicit.jsonl",
        [
            {"chosen": [u, {**A, "content": "good"}], "rejected": [u, {**A, "content": "bad"}]},
            {"chosen": "good", "rejected": "bad"},
        ],
    )
    write_jsonl(
        tmp_path / "sgp.jsonl",
        [
            {
                "conversations": [{"from": "human", "value": "Pick"}],
                "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"},
            },
        ],
    )
    prep = _prepare(
        tmp_path, tiny_qwen3, tiny_tokenizer, dpo=["explicit.jsonl", "implicit.jsonl", "sgp.jsonl"]
    )
    pairs = prep.splits["dpo_train"].rows
    expected = {"prompt": [u], "chosen": [{**A, "content": "good"}], "rejected": [{**A, "content": "bad"}]}
    assert pairs == [expected, expected, expected]
    assert [s["format"] for s in prep.sources if s["stage"] == "dpo"] == [
        "preference",
        "preference_implicit",
        "sharegpt_preference",
    ]
    by_file = {(Path(r["file"]).name, r["line"]): r["reason"] for r in prep.rejects}
    assert "identical" in by_file[("explicit.jsonl", 2)]
    assert "without a prompt" in by_file[("implicit.jsonl", 2)]
    _invariant(prep)


# ---------------------------------------------------------------- length, truncation, non-ASCII


def test_truncate_that_cuts_every_trained_token_rejects_the_row(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"prompt": "short", "completion": "ok"},
            {"prompt": "long " * 100, "completion": "answer"},
        ],
    )
    prep = _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="t.jsonl", max_length=48, truncation="truncate")
    assert "every trained token was cut" in _reasons(prep)[2]
    with pytest.raises(DataError, match="too long"):
        _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="t.jsonl", max_length=48, truncation="error")


def test_non_ascii_text_is_unchanged_through_loading_templating_and_rejects(
    tmp_path, tiny_qwen3, tiny_tokenizer
) -> None:
    zh = [
        {"role": "user", "content": "把这句话翻译成英文：你好，世界"},
        {**A, "content": "Hello, world — ça va?"},
    ]
    write_jsonl(
        tmp_path / "zh.jsonl", [{"messages": zh}, {"messages": [{"role": "用户", "content": "你好"}]}]
    )
    prep = _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="zh.jsonl")
    row = prep.splits["sft_train"].rows[0]
    assert row["messages"] == zh
    assert tiny_tokenizer.decode(row["input_ids"]) == tiny_tokenizer.apply_chat_template(zh, tokenize=False)
    assert "'用户'" in prep.rejects[0]["reason"]


def test_tokenizer_without_template_is_one_clear_error_and_chatml_by_name_fixes_it(
    tmp_path, tiny_qwen3, tiny_tokenizer
) -> None:
    from tunepipe.modeling import load_tokenizer

    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    bare = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(DataError, match=r"c.jsonl: .*has no chat template.*model.chat_template"):
        _prepare(tmp_path, tiny_qwen3, bare, sft="c.jsonl")
    # Plain text needs no template.
    write_jsonl(tmp_path / "t.jsonl", [{"text": "just text"}])
    assert len(_prepare(tmp_path, tiny_qwen3, bare, sft="t.jsonl").splits["sft_train"].rows) == 1
    cfg = load_config(tmp_path / "cfg.yaml", ["model.chat_template=chatml"])
    tok = load_tokenizer(cfg, log=lambda _m: None)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == (
        "<|im_start|>user\nx<|im_end|>\n"
    )


def test_weights_and_seeded_eval_split(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(10)])
    srcs = [{"path": "a.jsonl", "weight": 0.5}, {"path": "b.jsonl", "weight": 2}]
    prep = _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft=srcs)
    prompts = [c[0]["content"] for c in _convs(prep)]
    assert sum(p.startswith("a") for p in prompts) == 5 and sum(p.startswith("b") for p in prompts) == 20
    assert [s["rows_in"] for s in prep.sources] == [10, 10]  # weights never hide rows from the stats

    def split(seed: int) -> list[str]:
        cfg = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
        cfg["data"]["sft"] = {"train": "a.jsonl", "eval_split": 0.3}
        cfg["data"]["seed"] = seed
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        prep = prepare(load_config(tmp_path / "cfg.yaml"), tiny_tokenizer, log=lambda _m: None)
        train = [r["messages"][0]["content"] for r in prep.splits["sft_train"].rows]
        ev = [r["messages"][0]["content"] for r in prep.splits["sft_eval"].rows]
        assert len(ev) == 3 and len(train) == 7 and not set(ev) & set(train)
        return ev

    assert split(1) == split(1) and split(1) != split(2)


def test_a_missing_data_file_is_not_taken_for_a_hub_id(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    """`data/train.jsonl` fits the owner/name shape of a hub id; its suffix says it is a missing file."""
    with pytest.raises(DataError, match="data source not found: .*data/train.jsonl"):
        _prepare(tmp_path, tiny_qwen3, tiny_tokenizer, sft="data/train.jsonl")
