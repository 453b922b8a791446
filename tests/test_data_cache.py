"""The content-hash cache of prepared sources: hit when nothing changed, miss on any change that
could change the tokens or masks."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import skills_data

from tunepipe.config import load_config
from tunepipe.data.chat import tokenize_conversation
from tunepipe.data.prepare import prepare


def _cfg(tmp_path: Path, model: Path, **data) -> Path:
    skills_data(tmp_path / "data")
    cfg = {
        "model": {"name_or_path": str(model)},
        "data": {
            "sft": {"train": "data/skills_sft_train.jsonl", "eval": "data/skills_sft_eval.jsonl"},
            "dpo": {"train": "data/skills_dpo_train.jsonl"},
            "max_length": 128,
            **data,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(path: Path, tok, overrides: list[str] | None = None):
    return prepare(load_config(path, overrides or []), tok, log=lambda _m: None)


def test_unchanged_inputs_come_from_the_cache_and_equal_a_fresh_preparation(
    tmp_path, tiny_qwen3, tiny_tokenizer
) -> None:
    path = _cfg(tmp_path, tiny_qwen3, max_length=127)  # settings no other test uses: a cold cache
    cold = _run(path, tiny_tokenizer)
    assert cold.cache_hits == 0
    warm = _run(path, tiny_tokenizer)
    assert warm.cache_hits == 3
    assert {k: v.rows for k, v in warm.splits.items()} == {k: v.rows for k, v in cold.splits.items()}
    assert warm.sources == cold.sources
    # The batched path gives exactly what the one-conversation function gives.
    for row in cold.splits["sft_train"].rows[:5]:
        assert tokenize_conversation(tiny_tokenizer, row["messages"]) == (row["input_ids"], row["labels"])


def test_any_change_that_matters_misses_the_cache(tmp_path, tiny_qwen3, tiny_tokenizer) -> None:
    path = _cfg(tmp_path, tiny_qwen3)
    _run(path, tiny_tokenizer)
    assert _run(path, tiny_tokenizer).cache_hits == 3
    # max_length or masking policy: every source again.
    assert _run(path, tiny_tokenizer, ["data.max_length=100"]).cache_hits == 0
    assert _run(path, tiny_tokenizer, ["data.train_on=last"]).cache_hits == 0
    # One file's content: only that source.
    f = tmp_path / "data" / "skills_sft_eval.jsonl"
    f.write_text(f.read_text().replace("Reply with the answer only.", "Answer only."))
    assert _run(path, tiny_tokenizer).cache_hits == 2
    # The tokenizer's chat template.
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert _run(path, tok).cache_hits == 0
