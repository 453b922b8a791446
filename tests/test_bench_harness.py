"""The pure parts of the training benchmark (bench/_common.py): the mixed-length data generator, the
batch counting behind samples/s, loss tokens/s and padding share, and the median / ratio / PASS logic.
No model, no training: a few seconds."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "_common.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bc = _load_common()


def test_chat_rows_mix_short_and_long_within_the_range() -> None:
    rows = bc.chat_rows(64, seed=3, lo=20, hi=400)
    lengths = sorted(bc.approx_tokens(r["messages"]) for r in rows)
    assert len(rows) == 64
    assert lengths[0] >= 20 and lengths[-1] <= 400
    assert sum(n < 80 for n in lengths) >= 16  # short one-line skills
    assert sum(n > 250 for n in lengths) >= 6  # long paragraph rewrites
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert rows == bc.chat_rows(64, seed=3, lo=20, hi=400)  # seeded
    assert rows != bc.chat_rows(64, seed=4, lo=20, hi=400)


def test_chat_rows_respect_another_counter() -> None:
    def chars(messages: list[dict[str, str]]) -> int:
        return sum(len(m["content"]) for m in messages)

    rows = bc.chat_rows(20, seed=0, lo=100, hi=600, count=chars, short_share=0.0)
    assert all(100 <= chars(r["messages"]) <= 600 for r in rows)


def test_paragraph_replies_are_the_rewrite_of_the_prompt() -> None:
    rng = random.Random(0)
    name, sentences, messages = bc._paragraph_task(rng, 200, 400, bc.approx_tokens)
    assert messages[1]["content"] == bc._TASKS[name][1](sentences)
    assert all(s in messages[0]["content"] for s in sentences)


def test_preference_rows_have_distinct_replies_within_the_range() -> None:
    rows = bc.preference_rows(24, seed=1, lo=20, hi=400)
    assert len(rows) == 24
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert r["chosen"] != r["rejected"]
        assert r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
        assert bc.pair_length(r, bc.approx_tokens) <= 400
    assert max(bc.pair_length(r, bc.approx_tokens) for r in rows) > 150


def test_count_batch_padded_sft() -> None:
    # Two rows: 5 real tokens (3 trained) and 3 real tokens (2 trained), padded to 5.
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 3, 4, 5], [-100, 2, 3, -100, -100]]),
    }
    c = bc.count_batch(batch)
    assert (c.samples, c.tokens, c.real_tokens, c.loss_tokens, c.batches) == (2, 10, 8, 5, 1)
    assert c.padding_share == pytest.approx(0.2)


def test_count_batch_ignores_the_first_label_it_can_never_train() -> None:
    # Plain TRL on a conversational dataset trains every token: labels == input_ids, but after the shift
    # the first position of a row predicts nothing.
    batch = {"input_ids": torch.tensor([[7, 8, 9]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    assert bc.count_batch(batch).loss_tokens == 2


def test_count_batch_padding_free() -> None:
    # Three sequences of 2, 3 and 1 tokens flattened into one row; no padding.
    batch = {
        "input_ids": torch.tensor([[1, 2, 1, 2, 3, 1]]),
        "position_ids": torch.tensor([[0, 1, 0, 1, 2, 0]]),
        "labels": torch.tensor([[-100, 2, -100, 2, 3, -100]]),
    }
    c = bc.count_batch(batch)
    assert (c.samples, c.tokens, c.real_tokens, c.loss_tokens) == (3, 6, 6, 3)
    assert c.padding_share == 0.0
    # tunepipe's BlockCausalMask adds a [batch, 1, T, T] mask for sdpa/eager: still no padding.
    batch["attention_mask"] = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    assert bc.count_batch(batch) == c


def test_count_batch_preference_pairs() -> None:
    # One pair: chosen (4 tokens, 2 completion) and rejected (3 tokens, 1 completion), padded to 4.
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "completion_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]]),
    }
    c = bc.count_batch(batch)
    assert (c.samples, c.tokens, c.real_tokens, c.loss_tokens) == (1, 8, 7, 3)
    assert c.padding_share == pytest.approx(1 / 8)


def test_batch_counts_add_up() -> None:
    total = bc.BatchCounts()
    total.add(bc.BatchCounts(samples=2, tokens=10, real_tokens=8, loss_tokens=5, batches=1))
    total.add(bc.BatchCounts(samples=2, tokens=6, real_tokens=6, loss_tokens=4, batches=1))
    assert (total.samples, total.tokens, total.loss_tokens, total.batches) == (4, 16, 9, 2)
    assert total.padding_share == pytest.approx(2 / 16)
    assert bc.BatchCounts().padding_share == 0.0


def test_ratio_median_and_verdict() -> None:
    ours, theirs = [3.0, 2.0, 4.5], [2.0, 2.0, 2.5]  # per-pair ratios 1.5, 1.0, 1.8
    v = bc.verdict(ours, theirs, 1.5)
    assert v.ratios == pytest.approx([1.5, 1.0, 1.8])
    assert v.ratio == pytest.approx(1.5) and v.passed
    assert "PASS" in v.line("sft")
    assert not bc.verdict(ours, theirs, 1.6).passed
    assert "FAIL" in bc.verdict([], [], 1.3).line("dpo")
    assert bc.median([1.0, None, 3.0]) == 2.0 and bc.median([None]) is None


def test_eval_not_worse() -> None:
    assert bc.not_worse(0.50, 0.51, higher_is_better=False)  # lower loss
    assert not bc.not_worse(0.55, 0.51, higher_is_better=False)
    assert bc.not_worse(0.52, 0.51, higher_is_better=False, tolerance=0.02)
    assert bc.not_worse(0.75, 0.75, higher_is_better=True)
    assert not bc.not_worse(0.70, 0.75, higher_is_better=True)
    assert not bc.not_worse(None, 0.75, higher_is_better=True)


def test_result_line_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    bc.emit({"examples": 4, "train_s": 1.5})
    out = "noise\n" + capsys.readouterr().out + "more noise\n"
    assert bc.parse_result(out) == {"examples": 4, "train_s": 1.5}
    with pytest.raises(ValueError):
        bc.parse_result("no result here")


def test_table_lines_up() -> None:
    text = bc.table([("samples/s", [2.0, 1.0]), ("padding share", [0.1234, None])], ["metric", "a", "b"])
    lines = text.splitlines()
    assert len({len(x) for x in lines}) == 1  # every line padded to the same width
    assert "0.1234" in text and "-" in lines[-1]


def test_every_ablation_is_a_valid_config_with_its_switch_flipped(tmp_path: Path) -> None:
    """bench/train_speed.py --ablate writes tunepipe's defaults with one switch flipped: each variant must
    load as a config, hold the flipped value and differ from the defaults only there."""
    import argparse

    from tunepipe.config import load_config

    spec = importlib.util.spec_from_file_location("bench_train_speed", ROOT / "bench" / "train_speed.py")
    assert spec and spec.loader
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    args = argparse.Namespace(
        lora_r=16, lora_alpha=32, sft_lr=1e-3, dpo_lr=5e-4, sft_batch=4, dpo_batch=2, accum=1, max_length=512
    )
    data = tmp_path / "d.jsonl"
    for stage, variants in speed.ABLATIONS.items():
        base = load_config(speed.tunepipe_config(tmp_path, stage, f"{stage}-d", data, args, "m"))
        for i, (_label, overrides) in enumerate(variants):
            path = speed.tunepipe_config(tmp_path, stage, f"{stage}-{i}", data, args, "m", overrides)
            cfg = load_config(path)
            for dotted, value in overrides.items():
                section, key = dotted.split(".")
                assert getattr(getattr(cfg, section), key) == value
                assert getattr(getattr(base, section), key) != value, f"{dotted} is already the default"
