"""Bad inputs through `tunepipe data`: a bad row is a reject with its file, line and reason; a file that
cannot be read is one clear error naming it and the fix (exit 2, no traceback); a failed data stage
still writes rejects.jsonl and stats.json and leaves no stale splits; the sources are never changed."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tunepipe, write_jsonl

from tunepipe.config import load_config
from tunepipe.data.formats import RowError, check_turn_order
from tunepipe.data.prepare import DataError, prepare
from tunepipe.data.sources import SourceError, csv_delimiter, read_rows, scan

GOOD = {"prompt": "Add 2 and 3.", "completion": "5"}
U, A = "user", "assistant"


class Run:
    """One `tunepipe data` run over the sources in `tmp_path/in`, checked for what every run must do."""

    def __init__(self, tmp_path: Path, model: Path, train: Any, **data: Any) -> None:
        cfg = {
            "project": {"name": "faults", "output_dir": "runs/faults"},
            "model": {"name_or_path": str(model)},
            "dpo": {"enabled": False},
            "eval": {"models": ["base", "sft"]},
            "data": {"sft": {"train": train}, "max_bad_rows": 100, **data},
        }
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        inputs = sorted(p for p in (tmp_path / "in").rglob("*") if p.is_file())
        before = {p: p.read_bytes() for p in inputs}
        self.proc: subprocess.CompletedProcess[str] = tunepipe("data", path)
        self.output = self.proc.stdout + self.proc.stderr
        self.text = " ".join(self.output.split())  # the terminal may wrap long lines
        self.data_dir = tmp_path / "runs" / "faults" / "data"
        assert "Traceback" not in self.output, self.output
        assert {p: p.read_bytes() for p in inputs} == before  # the sources are never touched

    def expect(self, code: int, *texts: str) -> Run:
        assert self.proc.returncode == code, self.output
        for t in texts:
            assert t in self.text, f"{t!r} not in:\n{self.output}"
        return self

    def rejects(self) -> list[dict[str, Any]]:
        lines = (self.data_dir / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(x) for x in lines]

    def reasons(self) -> dict[tuple[str, int], str]:
        return {(Path(r["file"]).name, r["line"]): r["reason"] for r in self.rejects()}

    def stats(self) -> dict[str, Any]:
        stats = json.loads((self.data_dir / "stats.json").read_text())
        for s in stats["sources"]:
            assert s["rows_in"] == s["rows_accepted"] + s["rows_rejected"], s
        return stats


def _src(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- 1. a failed gate still writes its rejects


@pytest.mark.parametrize("case", ["max_bad_rows", "all_rejected_parquet_ints", "empty_file"])
def test_1_a_failed_data_gate_writes_the_rejects_it_points_to(tmp_path, tiny_qwen3, case: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if case == "max_bad_rows":
        write_jsonl(_src(tmp_path, "mixed.jsonl"), [GOOD, {"prompt": "x"}, GOOD])
        run = Run(tmp_path, tiny_qwen3, "in/mixed.jsonl", max_bad_rows=0)
        run.expect(2, "error: 1 of 3 rows rejected", "mixed.jsonl:2: missing field 'completion'")
        assert [(r["line"], r["reason"]) for r in run.rejects()] == [(2, "missing field 'completion'")]
        assert run.stats()["sources"][0]["rows_in"] == 3
    elif case == "all_rejected_parquet_ints":
        pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [1, 2]}), _src(tmp_path, "n.parquet"))
        run = Run(tmp_path, tiny_qwen3, "in/n.parquet")
        run.expect(
            2,
            "error: data.sft.train: no usable rows (2 of 2 rows rejected)",
            "n.parquet:1: completion: expected a string or a list of {role, content} messages, got int",
            'store it as text, e.g. "5"',
        )
        assert [r["line"] for r in run.rejects()] == [1, 2]
        (source,) = run.stats()["sources"]
        assert (source["rows_in"], source["rows_rejected"]) == (2, 2)
    else:
        _src(tmp_path, "empty.jsonl").write_text("\n\n")
        run = Run(tmp_path, tiny_qwen3, "in/empty.jsonl")
        run.expect(2, "empty.jsonl is empty: no rows", "add records, or remove the source")
        assert run.rejects() == []
        assert run.stats()["sources"][0]["rows_in"] == 0
    assert " ".join(run.stats()["error"].split()) in run.text  # stats.json says why the stage failed
    assert not list(run.data_dir.glob("sft_*.jsonl"))


# ---------------------------------------------------------------- 2. no stale outputs after a failure


def test_2_a_failed_data_stage_leaves_no_previous_splits(tmp_path, tiny_qwen3) -> None:
    data_dir = tmp_path / "runs" / "faults" / "data"
    data_dir.mkdir(parents=True)
    for name in ("sft_train.jsonl", "sft_eval.jsonl", "dpo_train.jsonl", "stats.json", "rejects.jsonl"):
        (data_dir / name).write_text("from the previous run\n")
    (data_dir / "my-notes.txt").write_text("not the stage's\n")
    write_jsonl(_src(tmp_path, "bad.jsonl"), [{"prompt": "q", "completion": " "}])
    run = Run(tmp_path, tiny_qwen3, "in/bad.jsonl")
    run.expect(2, "no usable rows", "bad.jsonl:1: completion: empty assistant response")
    assert sorted(p.name for p in data_dir.iterdir()) == ["my-notes.txt", "rejects.jsonl", "stats.json"]
    assert "bad.jsonl" in run.stats()["sources"][0]["file"] and run.stats()["splits"] == {}
    assert [r["line"] for r in run.rejects()] == [1]


# ---------------------------------------------------------------- 3. encodings


@pytest.mark.parametrize(("bom", "named"), [(True, "UTF-16"), (False, "UTF-16LE")])
def test_3_a_utf16_file_is_one_error_with_the_iconv_fix(tmp_path, tiny_qwen3, bom: bool, named: str) -> None:
    text = json.dumps(GOOD) + "\n"
    path = _src(tmp_path, "wide.jsonl")
    path.write_bytes(text.encode("utf-16") if bom else text.encode("utf-16-le"))
    run = Run(tmp_path, tiny_qwen3, "in/wide.jsonl")
    run.expect(2, f"{path}: not UTF-8", f"iconv -f {named} -t UTF-8 {path} >")
    (source,) = run.stats()["sources"]
    assert source["file"] == str(path) and f"iconv -f {named}" in source["error"]
    assert run.rejects() == []


def test_3_one_latin1_byte_rejects_only_its_line(tmp_path, tiny_qwen3) -> None:
    lines = [
        json.dumps(GOOD).encode(),
        b'{"prompt": "caf\xe9?", "completion": "yes"}',
        json.dumps(GOOD).encode(),
    ]
    _src(tmp_path, "l1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    _src(tmp_path, "l1.csv").write_bytes(b'prompt,completion\nhi,there\n"two\nlines",caf\xe9\nok,fine\n')
    run = Run(tmp_path, tiny_qwen3, ["in/l1.jsonl", "in/l1.csv"]).expect(0)
    assert run.reasons() == {
        ("l1.jsonl", 2): "not UTF-8: byte 0xe9 at column 16; save the file as UTF-8",
        ("l1.csv", 3): "not UTF-8: byte 0xe9 at line 4, column 11; save the file as UTF-8",
    }
    assert [(s["rows_in"], s["rows_accepted"]) for s in run.stats()["sources"]] == [(3, 2), (3, 2)]


def test_3_a_bad_byte_in_a_json_array_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(
        b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "\xe9", "completion": "b"}\n]\n'
    )
    with pytest.raises(SourceError, match=rf"{path}:3: not UTF-8: byte 0xe9 at column 15"):
        list(read_rows(path))


# ---------------------------------------------------------------- 4. a .parquet that is not parquet


def test_4_a_text_file_named_parquet_is_a_clear_error(tmp_path, tiny_qwen3) -> None:
    path = _src(tmp_path, "train.parquet")
    path.write_text(json.dumps(GOOD) + "\n")
    run = Run(tmp_path, tiny_qwen3, "in/train.parquet")
    run.expect(2, f"error: not a parquet file: {path}", "it looks like JSON: name it .jsonl")
    assert run.stats()["sources"][0]["format"] == "error"


# ---------------------------------------------------------------- 5. invalid JSON columns


# Each broken line, the 1-based character column an editor shows for the problem, what is there, and
# the reason given.
BROKEN = [
    ('{"prompt": "a", "completion": "b",}', 34, ",", "trailing comma at column 34"),
    ('{"prompt": "a", "completion": "b}', 31, '"', "unterminated string starting at column 31"),
    ('    {"prompt": "a" "completion": "b"}', 20, '"', "Expecting ',' delimiter at column 20"),
    (
        '{"prompt": "日本語 é", "completion": "b" x}',
        39,
        "x",
        "Expecting ',' delimiter at column 39",
    ),  # byte 46
    (
        '{"prompt": "a", "completion": "b"',
        34,
        "",
        "Expecting ',' delimiter at the end of the line (column 34)",
    ),
]


def test_5_invalid_json_columns_are_editor_columns(tmp_path, tiny_qwen3) -> None:
    assert [line[col - 1 : col] for line, col, _, _ in BROKEN] == [at for _, _, at, _ in BROKEN]
    path = _src(tmp_path, "broken.jsonl")
    body = [json.dumps(GOOD), *(b[0] for b in BROKEN), "\ufeff" + json.dumps(GOOD)]
    # A byte-order mark opens line 1 (an editor hides it): the columns of line 1 do not count it.
    path.write_text("\ufeff" + '{"prompt": "a",, "completion": "b"}\n' + "\n".join(body) + "\n", "utf-8")
    run = Run(tmp_path, tiny_qwen3, "in/broken.jsonl").expect(0)
    reasons = {line: reason for (_, line), reason in run.reasons().items()}
    assert sorted(reasons) == [1, 3, 4, 5, 6, 7, 8]
    assert reasons[1] == "invalid JSON: Expecting property name enclosed in double quotes at column 16"
    for n, (_, _, _, said) in enumerate(BROKEN, 3):
        assert reasons[n].startswith(f"invalid JSON: {said}"), (n, reasons[n])
    assert "spread over several lines" in reasons[7]
    assert reasons[8].startswith("invalid JSON: the line starts with a byte-order mark")
    (source,) = run.stats()["sources"]
    assert (source["rows_in"], source["rows_accepted"]) == (8, 1)


# ---------------------------------------------------------------- 6. CSV delimiters


def test_6_a_semicolon_csv_is_read_and_the_delimiter_recorded(tmp_path, tiny_qwen3) -> None:
    with _src(tmp_path, "semi.csv").open("w", newline="") as fh:
        w = csv.writer(fh, delimiter=";")
        w.writerow(["prompt", "completion"])
        w.writerows([["Add 2; and 3.", "5"], ["Add 1 and 1.", "2"], ["only one field"]])
    run = Run(tmp_path, tiny_qwen3, "in/semi.csv").expect(0, "read with the delimiter ';', not ','")
    (source,) = run.stats()["sources"]
    assert source["delimiter"] == ";" and source["format"] == "prompt_completion"
    assert (source["rows_in"], source["rows_accepted"]) == (3, 2)
    assert run.reasons() == {("semi.csv", 4): "has 1 fields, the header has 2"}


@pytest.mark.parametrize(("text", "suffix", "expected"), [
    ("prompt;completion\na;b\n", ".csv", ";"),
    ("prompt|completion\na|b\nc|d\n", ".csv", "|"),
    ("prompt\tcompletion\na\tb\n", ".csv", "\t"),
    ("prompt,completion\na;x,b\n", ".csv", ","),
    ("prompt,completion\na,b\n", ".tsv", ","),
    ("text\nhello; world\n", ".csv", ","),  # one column: nothing to split
])  # fmt: skip
def test_6_delimiter_detection(tmp_path, text: str, suffix: str, expected: str) -> None:
    path = tmp_path / f"f{suffix}"
    path.write_text(text)
    assert csv_delimiter(path) == expected


def test_6_an_unsplittable_header_hints_at_the_delimiter(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    (tmp_path / "x.csv").write_text("prompt:completion\na:b\n")
    cfg = {"model": {"name_or_path": str(tiny_qwen3)}, "dpo": {"enabled": False}}
    cfg |= {"eval": {"models": ["base", "sft"]}, "data": {"sft": {"train": "x.csv"}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataError, match=r"(?s)unknown data format.*delimiter ','.*header is one column"):
        prepare(load_config(tmp_path / "cfg.yaml"), tiny_tokenizer, log=lambda _m: None)


# ---------------------------------------------------------------- 7. turn order


def _m(*roles: str) -> list[dict[str, str]]:
    return [{"role": r, "content": f"{r} {i}"} for i, r in enumerate(roles)]


def test_7_conversations_out_of_order_are_rejected_with_the_turn(tmp_path, tiny_qwen3) -> None:
    write_jsonl(
        _src(tmp_path, "conv.jsonl"),
        [
            {"messages": _m("system", U, A, U, A)},  # 1: fine
            {"messages": _m(A, U, A)},  # 2: the assistant speaks first
            {"messages": _m(U, U, A)},  # 3: two user turns
            {"messages": _m(U, A, "system", U, A)},  # 4: a system turn in the middle
            {"messages": _m(U, A, U)},  # 5: ends with the user
            {
                "system": "S",
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                    {"from": "gpt", "value": "a again"},
                ],
            },  # 6: sharegpt, two assistant turns; turn numbers count the user's list, not the system
        ],
    )
    run = Run(tmp_path, tiny_qwen3, "in/conv.jsonl").expect(0)
    assert {line: reason for (_, line), reason in run.reasons().items()} == {
        2: "messages: turn 1 is 'assistant': the first turn after the system prompt must be the user's",
        3: "messages: turn 2 is 'user', after 'user': user and assistant turns must alternate",
        4: "messages: turn 3 is 'system', after 'assistant': a system turn comes only first",
        5: "messages: the last turn (turn 3) is 'user': an SFT conversation must end with the "
        "assistant's reply",
        6: "conversations: turn 3 is 'assistant', after 'assistant': user and assistant turns must alternate",
    }
    assert run.stats()["sources"][0]["rows_accepted"] == 1


def test_7_turn_order_rules() -> None:
    tool_call = [{"role": U, "content": "q"}, {"role": A, "content": "", "tool_calls": [{}]}]
    check_turn_order([*tool_call, {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"},
                      {"role": A, "content": "a"}], "messages")  # fmt: skip
    check_turn_order(_m(U, A, U, A), "messages")
    with pytest.raises(RowError, match="turn 1 is 'tool': the first turn after the system prompt"):
        check_turn_order(_m("tool", A), "messages")
    with pytest.raises(RowError, match="turn 2 is 'tool', after 'user': a tool result must follow"):
        check_turn_order(_m(U, "tool", A), "messages")
    with pytest.raises(RowError, match="turn 4 is 'user', after 'tool': the assistant replies"):
        check_turn_order([*tool_call, {"role": "tool", "content": "1"}, {"role": U, "content": "x"}], "m")
    with pytest.raises(RowError, match="the last turn \\(turn 3\\) is 'tool'"):
        check_turn_order([*tool_call, {"role": "tool", "content": "1"}], "messages")


# ---------------------------------------------------------------- 8. skipped files are reported


def test_8_unsupported_files_in_a_folder_are_skipped_and_listed(tmp_path, tiny_qwen3) -> None:
    write_jsonl(_src(tmp_path, "d/train.jsonl"), [GOOD])
    _src(tmp_path, "d/notes.txt").write_text("notes")
    _src(tmp_path, "d/sub/README.md").write_text("# data")
    _src(tmp_path, "d/.gitkeep").write_text("")
    run = Run(tmp_path, tiny_qwen3, "in/d").expect(
        0, f"skipped {tmp_path / 'in/d/notes.txt'}: unsupported type .txt", "README.md: unsupported type .md"
    )
    skipped = run.stats()["skipped_files"]
    assert [(Path(s["file"]).name, s["reason"]) for s in skipped] == [
        ("notes.txt", "unsupported type .txt"),
        ("README.md", "unsupported type .md"),
    ]
    assert ".gitkeep" not in run.output
    assert [Path(s["file"]).name for s in run.stats()["sources"]] == ["train.jsonl"]
    assert run.rejects() == []


def test_8_a_folder_of_only_unsupported_files_names_them(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match=r"no .* files found under .*d \(it holds only notes.txt\)"):
        scan(tmp_path / "d")


# ---------------------------------------------------------------- 9. the cache keeps the current path


def test_9_rejects_of_cached_content_carry_the_path_read_now(tmp_path, tiny_qwen3) -> None:
    rows = [GOOD, {"prompt": "no completion"}]
    first, second = (
        write_jsonl(_src(tmp_path, "a/x.jsonl"), rows),
        write_jsonl(_src(tmp_path, "b/x.jsonl"), rows),
    )
    run = Run(tmp_path, tiny_qwen3, ["in/a/x.jsonl", "in/b/x.jsonl"]).expect(0, "taken from the cache")
    assert [(r["file"], r["line"]) for r in run.rejects()] == [(str(first), 2), (str(second), 2)]
    assert [s["file"] for s in run.stats()["sources"]] == [str(first), str(second)]
