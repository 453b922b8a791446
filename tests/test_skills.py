"""The quickstart skills data: deterministic, held-out, and every answer verifiably right."""

from __future__ import annotations

import json
import re
from datetime import date

from conftest import ROOT

from tunepipe.quickstart.skills import generate


def _check(question: str, answer: str) -> bool:
    """An independent checker for each task's exact answer format."""
    if m := re.search(r"date (\d{4})-(\d{2})-(\d{2}) as DD/MM/YYYY", question):
        y, mo, d = m.groups()
        date(int(y), int(mo), int(d))
        return answer == f"{d}/{mo}/{y}"
    if m := re.search(r"Sort in ascending order: (.*)$", question):
        return answer == ", ".join(str(x) for x in sorted(int(v) for v in m.group(1).split(",")))
    if m := re.search(r"Convert (\d+) (\w+) to (\w+)\.", question):
        factor = {"meters": 1000, "grams": 1000, "centimeters": 100, "milliliters": 1000}[m.group(3)]
        return answer == str(int(m.group(1)) * factor)
    if m := re.search(r"What is (\d+) \+ (\d+)\?", question):
        return answer == str(int(m.group(1)) + int(m.group(2)))
    if m := re.search(r"Write '(.*)' in capital letters\.", question):
        return answer == m.group(1).upper()
    if m := re.search(r"Write '(.*)' in lowercase letters\.", question):
        return answer == m.group(1).lower()
    if m := re.search(r"Reverse the order of these words: (.*)$", question):
        return answer == " ".join(reversed(m.group(1).split()))
    raise AssertionError(f"no checker for {question!r}")


def test_committed_quickstart_data_is_the_seed_0_generation() -> None:
    splits = generate(seed=0)
    for name, rows in splits.items():
        path = ROOT / "examples" / "data" / f"skills_{name}.jsonl"
        assert [json.loads(x) for x in path.read_text().splitlines()] == rows, path


def test_generation_is_seeded() -> None:
    assert generate(seed=3) == generate(seed=3)
    assert generate(seed=3) != generate(seed=4)


def test_eval_questions_are_held_out() -> None:
    s = generate(seed=0)

    def questions(rows):  # noqa: E306
        return {json.dumps(r.get("messages", r.get("prompt"))[:2]) for r in rows}

    train = questions(s["sft_train"]) | questions(s["dpo_train"])
    assert not train & questions(s["sft_eval"]) and not train & questions(s["dpo_eval"])


def test_answers_are_correct_and_rejected_differs() -> None:
    s = generate(seed=0)
    for r in s["sft_train"] + s["sft_eval"]:
        assert _check(r["messages"][-2]["content"], r["messages"][-1]["content"]), r
    tasks = set()
    for r in s["dpo_train"] + s["dpo_eval"]:
        q = r["prompt"][-1]["content"]
        good, bad = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert good != bad and _check(q, good) and not _check(q, bad), r
        tasks.add(r["task"])
    assert len(tasks) == 7
    # Half the pairs teach a skill that the SFT data never shows.
    assert {r["task"] for r in s["sft_train"]} == tasks - {"lowercase"}
    assert sum(r["task"] == "lowercase" for r in s["dpo_eval"]) == len(s["dpo_eval"]) // 2
