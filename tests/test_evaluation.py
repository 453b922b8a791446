"""Metrics code on a tiny random model: batching and padding must not change any number."""

from __future__ import annotations

import pytest
import torch

from tunepipe.data.chat import tokenize_conversation
from tunepipe.evaluation import exact_match, generate, preference_accuracy, sequence_logprobs

CONVS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
    [
        {"role": "system", "content": "Reply with the answer only."},
        {"role": "user", "content": "Sort in ascending order: 9, 2, 5, 71"},
        {"role": "assistant", "content": "2, 5, 9, 71"},
    ],
    [{"role": "user", "content": "Convert 3 kg to grams."}, {"role": "assistant", "content": "3000"}],
]


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen3).eval()


def _reference_logprob(model, ids: list[int], labels: list[int]) -> float:
    """Unbatched, full-logits computation of sum log p(labelled tokens)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return sum(logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != -100)


def test_sequence_logprobs_match_the_unbatched_full_logits(model, tiny_tokenizer) -> None:
    seqs = [tokenize_conversation(tiny_tokenizer, c) for c in CONVS]
    got = sequence_logprobs(model, seqs, tiny_tokenizer.pad_token_id, batch_size=2)
    for (ids, labels), (lp, n) in zip(seqs, got, strict=True):
        assert n == sum(x != -100 for x in labels)
        assert lp == pytest.approx(_reference_logprob(model, ids, labels), abs=1e-4)


def test_batched_left_padded_generation_equals_one_by_one(model, tiny_tokenizer) -> None:
    prompts = [
        tiny_tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in CONVS
    ]
    batched = generate(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tiny_tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert tiny_tokenizer.padding_side == "right"  # restored after generation


def test_exact_match_compares_the_reply_with_the_reference(model, tiny_tokenizer) -> None:
    rows = [{"messages": c} for c in CONVS]
    score, samples = exact_match(model, tiny_tokenizer, rows, max_new_tokens=6, batch_size=2)
    assert [s["reference"] for s in samples] == ["42", "2, 5, 9, 71", "3000"]
    assert score == sum(s["prediction"].strip() == s["reference"] for s in samples) / 3


def test_preference_accuracy_counts_pairs_where_chosen_is_more_likely(model, tiny_tokenizer) -> None:
    prompt = CONVS[0][:1]
    pairs = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": b}],
        }
        for a, b in [("42", "43"), ("43", "42")]
    ]
    acc, margins = preference_accuracy(model, tiny_tokenizer, pairs, batch_size=4)
    # The same two answers swapped: exactly one of the pairs is won, margins are opposite.
    assert margins[0] == pytest.approx(-margins[1], abs=1e-5) and margins[0] != 0
    assert acc == 0.5
