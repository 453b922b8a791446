"""Seeded generator of small, verifiable skill tasks for the quickstart.

Every task has exactly one correct answer in an exact format, so `exact_match` measures whether
fine-tuning taught both the skill and the format. Preference pairs put the correct answer against a
plausible wrong one (swapped day and month, a missing zero, an off-by-one sum, ...).

Every other preference pair is a skill the SFT data never shows (`lowercase`, whose tempting wrong
answer is to echo the capitals back), so the preference stage has something to teach that SFT did
not: the report then shows what DPO adds, not only what it keeps.

    python -m tunepipe.quickstart.skills --out examples/data --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SYSTEM = "Reply with the answer only."

WORDS = """
apple river stone cloud green table music light paper water house bread chair smile tiger
ocean plant glass dream honey lemon night sugar train world piano earth storm candle
forest garden window silver rabbit yellow orange purple castle bridge winter summer spring
autumn market pencil rocket planet mirror button pocket ladder jacket basket bottle dragon
guitar island jungle kitten letter meadow number object parrot puzzle rubber saddle shadow
signal simple spirit ticket tomato tunnel valley violet wallet wonder
""".split()  # noqa: SIM905 (a word list reads better as text)
UNITS = [("km", "meters", 1000), ("kg", "grams", 1000), ("m", "centimeters", 100), ("L", "milliliters", 1000)]

# A task returns (question, correct answer, plausible wrong answer).
Task = Callable[[random.Random], tuple[str, str, str]]


def date_reformat(rng: random.Random) -> tuple[str, str, str]:
    y, mo, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    if d == mo:
        d = d % 28 + 1
    q = f"Rewrite the date {y}-{mo:02d}-{d:02d} as DD/MM/YYYY."
    return q, f"{d:02d}/{mo:02d}/{y}", f"{mo:02d}/{d:02d}/{y}"


def unit_conversion(rng: random.Random) -> tuple[str, str, str]:
    unit, target, factor = rng.choice(UNITS)
    n = rng.randint(2, 99)
    wrong = n * (factor // 10) if rng.random() < 0.5 else n * factor * 10
    return f"Convert {n} {unit} to {target}.", str(n * factor), str(wrong)


def sort_numbers(rng: random.Random) -> tuple[str, str, str]:
    nums = rng.sample(range(1, 100), 4)
    while nums == sorted(nums):
        rng.shuffle(nums)
    good = sorted(nums)
    wrong = good[:]
    i = rng.randrange(3)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    q = f"Sort in ascending order: {', '.join(map(str, nums))}"
    return q, ", ".join(map(str, good)), ", ".join(map(str, wrong))


def addition(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 89), rng.randint(10, 89)
    off = rng.choice([-10, -1, 1, 10])
    return f"What is {a} + {b}?", str(a + b), str(a + b + off)


def uppercase(rng: random.Random) -> tuple[str, str, str]:
    w = " ".join(rng.sample(WORDS, 2))
    return f"Write '{w}' in capital letters.", w.upper(), w.title()


def reverse_words(rng: random.Random) -> tuple[str, str, str]:
    ws = rng.sample(WORDS, 3)
    wrong = [ws[1], ws[0], ws[2]] if rng.random() < 0.5 else ws
    return f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws)), " ".join(wrong)


def lowercase(rng: random.Random) -> tuple[str, str, str]:
    w = " ".join(rng.sample(WORDS, 2))
    return f"Write '{w.upper()}' in lowercase letters.", w, w.upper()


TASKS: dict[str, Task] = {
    "date_reformat": date_reformat,
    "unit_conversion": unit_conversion,
    "sort_numbers": sort_numbers,
    "addition": addition,
    "uppercase": uppercase,
    "reverse_words": reverse_words,
}
# Taught by the preference data only.
PREFERENCE_ONLY: dict[str, Task] = {"lowercase": lowercase}


def _conversation(q: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def generate(
    seed: int = 0, n_sft_train: int = 480, n_sft_eval: int = 48, n_dpo_eval: int = 48, n_dpo_train: int = 240
) -> dict[str, list[dict]]:
    """Four splits with no question shared between them; tasks are interleaved round-robin."""
    rng = random.Random(seed)
    seen: set[str] = set()
    sft_names = list(TASKS)
    # Preference pairs alternate: an SFT skill, then a preference-only skill.
    pref_names = [n for pair in zip(sft_names, ["lowercase"] * len(sft_names), strict=True) for n in pair]
    tasks = {**TASKS, **PREFERENCE_ONLY}

    def items(n: int, names: list[str]):
        out = []
        for _attempt in range(100 * n + 100):
            if len(out) == n:
                break
            name = names[len(out) % len(names)]
            q, good, bad = tasks[name](rng)
            if q in seen or good == bad:
                continue
            seen.add(q)
            out.append((name, q, good, bad))
        if len(out) < n:
            raise ValueError(f"could only make {len(out)} distinct tasks of {n} requested")
        return out

    def sft(n: int) -> list[dict]:
        return [
            {"messages": [*_conversation(q), {"role": "assistant", "content": good}], "task": name}
            for name, q, good, _ in items(n, sft_names)
        ]

    def prefs(n: int) -> list[dict]:
        return [
            {
                "prompt": _conversation(q),
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
                "task": name,
            }
            for name, q, good, bad in items(n, pref_names)
        ]

    # Eval splits first so they do not depend on the train sizes.
    out = {"sft_eval": sft(n_sft_eval), "dpo_eval": prefs(n_dpo_eval)}
    out["sft_train"] = sft(n_sft_train)
    out["dpo_train"] = prefs(n_dpo_train)
    return out


def write_skills_data(out_dir: Path, seed: int = 0, **sizes: int) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate(seed, **sizes).items():
        path = out_dir / f"skills_{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for skills_{sft,dpo}_{train,eval}.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for split, path in write_skills_data(args.out, args.seed).items():
        print(f"{split:10s} {path}")


if __name__ == "__main__":
    main()
