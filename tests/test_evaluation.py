"""Metrics code on a tiny random model: batching and padding must not change any number."""

from __future__ import annotations

import pytest
import torch

from tunepipe.data.chat import tokenize_conversation
from tunepipe.evaluation import generate, preference_margins, sequence_logprobs, stop_token_ids

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


def _biased(model, tok, favour: dict[str, float]):
    """A copy of `model` whose next-token distribution ignores the context: the LM head's weights are
    zero and its bias gives each token a fixed logit (0, or the value in `favour`). Log-probabilities
    are then known in closed form, so the expected metrics are known by construction."""
    import copy

    m = copy.deepcopy(model)
    vocab = m.get_output_embeddings().weight.shape[0]
    head = torch.nn.Linear(m.config.hidden_size, vocab, bias=True)
    torch.nn.init.zeros_(head.weight)
    bias = torch.zeros(vocab)
    for text, logit in favour.items():
        ids = tok.convert_tokens_to_ids(text) if text in tok.get_vocab() else None
        assert ids is not None, text
        bias[ids] = logit
    head.bias.data = bias
    m.config.tie_word_embeddings = False
    m.lm_head = head
    return m.eval(), torch.log_softmax(bias, dim=-1)


def test_generation_stops_at_eos(model, tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    prompt = tok.apply_chat_template(CONVS[0][:1], tokenize=False, add_generation_prompt=True)
    # EOS (<|im_end|> here) is by far the likeliest token: the reply ends at once, empty.
    eos_first, _ = _biased(model, tok, {"<|im_end|>": 30.0})
    assert generate(eos_first, tok, [prompt], max_new_tokens=12, batch_size=1) == [""]
    # 'a' most likely: no stop token is ever produced, so generation runs to max_new_tokens.
    never, _ = _biased(model, tok, {"a": 30.0})
    out = generate(never, tok, [prompt], max_new_tokens=12, batch_size=1)[0]
    assert out == "a" * 12


def test_generation_stops_at_the_templates_end_of_turn_token(model, tiny_tokenizer, tmp_path) -> None:
    """A tokenizer whose EOS is not the template's end-of-turn token (a base model's EOS with a chat
    template added): generation must still stop at <|im_end|>."""
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, eos_token="<|endoftext|>")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != eot
    m, _ = _biased(model, tok, {"<|im_end|>": 30.0})
    m.generation_config.eos_token_id = tok.eos_token_id
    assert eot in stop_token_ids(m, tok)
    prompt = tok.apply_chat_template(CONVS[0][:1], tokenize=False, add_generation_prompt=True)
    assert generate(m, tok, [prompt], max_new_tokens=12, batch_size=1) == [""]


def test_sampling_is_seeded_and_differs_from_greedy(model, tiny_tokenizer) -> None:
    prompts = [
        tiny_tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in CONVS
    ]
    kw = dict(max_new_tokens=8, batch_size=3, do_sample=True, temperature=1.5, top_p=1.0)
    a = generate(model, tiny_tokenizer, prompts, seed=1, **kw)
    b = generate(model, tiny_tokenizer, prompts, seed=1, **kw)
    greedy = generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert a == b  # the same seed gives the same samples
    assert a != greedy  # a random 400-token model at temperature 1.5 does not sample the argmax 24 times


def test_preference_margin_and_accuracy_known_by_construction(model, tiny_tokenizer) -> None:
    """With context-free log-probs, log p(reply) is a sum of fixed per-token values: a reply made of
    the favoured token beats one made of a disfavoured token by an amount computed here by hand."""
    tok = tiny_tokenizer
    m, logp = _biased(model, tok, {"a": 4.0, "b": -4.0})
    a_id, b_id = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    prompt = [{"role": "user", "content": "pick one"}]

    def pair(chosen: str, rejected: str) -> dict:
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }

    for reply in ("aaa", "bbb"):  # each letter is its own token in this tokenizer
        assert tok(reply, add_special_tokens=False)["input_ids"] in ([a_id] * 3, [b_id] * 3)
    margins = preference_margins(m, tok, [pair("aaa", "bbb"), pair("bbb", "aaa"), pair("aaa", "aaa")], 4)
    expected = 3 * (logp[a_id] - logp[b_id]).item()  # the closing tokens are equally likely on both sides
    assert margins[0] == pytest.approx(expected, rel=1e-4)
    assert margins[1] == pytest.approx(-expected, rel=1e-4)
    assert margins[2] == pytest.approx(0.0, abs=1e-4)
    accuracy = sum(x > 0 for x in margins) / len(margins)
    assert accuracy == pytest.approx(1 / 3)  # a tie is not a win
