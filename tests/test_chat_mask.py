"""Loss only on assistant tokens, end-of-turn token included, for any number of turns."""

from __future__ import annotations

import pytest

from tunepipe.data.chat import IGNORE_INDEX, TemplateError, prompt_text, tokenize_conversation

CONV = [
    {"role": "system", "content": "Reply with the answer only."},
    {"role": "user", "content": "Sort in ascending order: 9, 2, 5"},
    {"role": "assistant", "content": "2, 5, 9"},
    {"role": "user", "content": "Convert 3 kg to grams."},
    {"role": "assistant", "content": "3000"},
]


def _trained_text(tok, ids: list[int], labels: list[int]) -> list[str]:
    """Decode each contiguous run of trained tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i, "labels must equal the input ids where trained"
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_multi_turn_mask_is_exactly_the_assistant_replies_with_end_of_turn(tiny_tokenizer) -> None:
    ids, labels = tokenize_conversation(tiny_tokenizer, CONV)
    assert len(ids) == len(labels)
    assert _trained_text(tiny_tokenizer, ids, labels) == ["2, 5, 9<|im_end|>", "3000<|im_end|>"]
    # Nothing from the system or user turns, nor the role headers, is trained.
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(lab == eot for lab in labels) == 2 and ids.count(eot) == 5


def test_train_on_last_masks_earlier_assistant_turns(tiny_tokenizer) -> None:
    ids, labels = tokenize_conversation(tiny_tokenizer, CONV, train_on="last")
    assert _trained_text(tiny_tokenizer, ids, labels) == ["3000<|im_end|>"]


def test_input_ids_are_the_plain_template_rendering(tiny_tokenizer) -> None:
    ids, _ = tokenize_conversation(tiny_tokenizer, CONV)
    expected = tiny_tokenizer.apply_chat_template(CONV, tokenize=False)
    assert tiny_tokenizer.decode(ids) == expected


def test_prompt_text_ends_with_the_generation_prompt(tiny_tokenizer) -> None:
    text = prompt_text(tiny_tokenizer, CONV)
    assert text.endswith("Convert 3 kg to grams.<|im_end|>\n<|im_start|>assistant\n")
    assert "3000" not in text


def test_template_that_rewrites_history_is_reported(tiny_tokenizer) -> None:
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    # A template that renders the turn count into every message cannot be split by prefixes.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ messages|length }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="train_on: last"):
        tokenize_conversation(tok, CONV)


# Written for this test in the shape of Qwen3's template: replies after the last user turn open with
# a think block (holding `reasoning_content`, or empty), earlier replies lose it, and
# enable_thinking=false puts an empty think block into the generation prompt.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + m.content"
    " + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)


@pytest.fixture()
def thinking_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = QWEN3_STYLE
    return tok


@pytest.mark.parametrize("enable_thinking", [None, False, True])
def test_thinking_template_multi_turn_trains_replies_not_empty_think_blocks(
    thinking_tokenizer, enable_thinking
) -> None:
    ids, labels = tokenize_conversation(thinking_tokenizer, CONV, enable_thinking=enable_thinking)
    # The earlier reply is rendered without a think block inside the whole conversation; the last
    # one gets an empty block that is not trained.
    assert "<think>\n\n</think>" in thinking_tokenizer.decode(ids)
    assert _trained_text(thinking_tokenizer, ids, labels) == ["2, 5, 9<|im_end|>", "3000<|im_end|>"]


def test_reasoning_in_the_data_is_kept_and_trained(thinking_tokenizer) -> None:
    conv = [*CONV[:-1], {"role": "assistant", "content": "3000", "reasoning_content": "1 kg is 1000 g."}]
    ids, labels = tokenize_conversation(thinking_tokenizer, conv)
    assert _trained_text(thinking_tokenizer, ids, labels) == [
        "2, 5, 9<|im_end|>",
        "<think>\n1 kg is 1000 g.\n</think>\n\n3000<|im_end|>",
    ]
