"""Chat templates and assistant-only loss masks that work for any template.

The template is rendered incrementally: for assistant turn i, the text of the conversation up to
turn i-1 with the generation prompt marks where the reply starts, and the text up to turn i marks
where it ends (the end-of-turn token included, so the model learns to stop). Characters are mapped to
tokens with the tokenizer's offset mapping, so no `{% generation %}` markers are needed.
"""

from __future__ import annotations

import re
from typing import Any

from .formats import Conversation

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used (missing, or not prefix-stable)."""


def template_kwargs(enable_thinking: bool | None) -> dict[str, Any]:
    return {} if enable_thinking is None else {"enable_thinking": enable_thinking}


def render(
    tokenizer: Any,
    messages: Conversation,
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the tokenizer has no chat template; set `model.chat_template` to a .jinja file or template text"
        )
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs(enable_thinking),
    )


# Templates such as Qwen3's open every reply after the last user turn with a think block; an empty
# one is template scaffolding, not something to learn.
_EMPTY_THINK = re.compile(r"\s*<think>\s*</think>\s*")


def _locate(full: str, piece: str, content: str, cursor: int) -> tuple[int, int] | None:
    """Find an assistant reply rendered on its own (`piece`) inside the whole conversation.

    Templates may render a turn differently once later turns follow (Qwen3 drops the reasoning and
    the think block from earlier replies), so try the piece, the piece without an empty think
    block, then the reply text with what the template puts after it (the end-of-turn token)."""
    candidates = [piece]
    m = _EMPTY_THINK.match(piece)
    if m:
        candidates.append(piece[m.end() :])
    k = piece.rfind(content) if content else -1
    if k > 0:
        candidates.append(piece[k:])
    for cand in candidates:
        pos = full.find(cand, cursor) if cand else -1
        if pos >= 0:
            return pos, pos + len(cand)
    return None


def assistant_spans(
    tokenizer: Any, messages: Conversation, *, train_on: str = "all", enable_thinking: bool | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the trained assistant turns."""
    full = render(tokenizer, messages, enable_thinking=enable_thinking)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i in turns:
        before = (
            render(tokenizer, messages[:i], add_generation_prompt=True, enable_thinking=enable_thinking)
            if i > 0
            else ""
        )
        upto = render(tokenizer, messages[: i + 1], enable_thinking=enable_thinking)
        # Trailing whitespace after the end-of-turn token is formatting, not something to learn.
        end = len(upto.rstrip())
        span: tuple[int, int] | None = None
        if upto.startswith(before):
            if full.startswith(upto[:end]) and len(before) >= cursor:
                span = (len(before), end)
            else:
                span = _locate(full, upto[len(before) : end], messages[i]["content"], cursor)
        if span is None:
            raise TemplateError(
                f"the chat template renders assistant turn {i} so differently inside the whole "
                "conversation that it cannot be located; use `data.train_on: last` "
                "or set `model.chat_template`"
            )
        m = _EMPTY_THINK.match(full, span[0])
        if m and m.end() <= span[1]:
            span = (m.end(), span[1])
        if span[1] > span[0]:
            spans.append(span)
        cursor = span[1]
    return full, spans


def tokenize_conversation(
    tokenizer: Any, messages: Conversation, *, train_on: str = "all", enable_thinking: bool | None = None
) -> tuple[list[int], list[int]]:
    """input_ids and labels, with labels = IGNORE_INDEX everywhere except assistant replies."""
    text, spans = assistant_spans(tokenizer, messages, train_on=train_on, enable_thinking=enable_thinking)
    # The template already holds the special tokens (BOS, turn markers); don't add them twice.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    return ids, labels_from_offsets(ids, enc["offset_mapping"], spans)


def prompt_text(tokenizer: Any, messages: Conversation, enable_thinking: bool | None = None) -> str:
    """The prompt for generation: every message before the last assistant turn, plus the generation prompt."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return render(tokenizer, messages[:last], add_generation_prompt=True, enable_thinking=enable_thinking)


def labels_from_offsets(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    if not spans:
        return labels
    k = 0  # spans are ordered and disjoint, offsets increase: one pass
    for j, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k == len(spans):
            break
        if e > s and s < spans[k][1] and e > spans[k][0]:
            labels[j] = ids[j]
    return labels


def tokenize_conversations(
    tokenizer: Any,
    convs: list[Conversation],
    train_on: list[str],
    enable_thinking: bool | None = None,
    batch_size: int = 512,
) -> list[tuple[list[int], list[int]] | TemplateError]:
    """tokenize_conversation for many conversations: templates rendered one by one, the text tokenized
    in batches (the fast tokenizer encodes a batch on all cores). A conversation whose template fails
    gets its TemplateError in its place."""
    rendered: list[tuple[str, list[tuple[int, int]]] | TemplateError] = []
    for conv, mode in zip(convs, train_on, strict=True):
        try:
            rendered.append(assistant_spans(tokenizer, conv, train_on=mode, enable_thinking=enable_thinking))
        except TemplateError as e:
            rendered.append(e)
    out: list[tuple[list[int], list[int]] | TemplateError] = list(rendered)  # type: ignore[arg-type]
    ok = [i for i, r in enumerate(rendered) if not isinstance(r, TemplateError)]
    for b in range(0, len(ok), batch_size):
        idx = ok[b : b + batch_size]
        texts = [rendered[i][0] for i in idx]  # type: ignore[index]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for i, ids, offsets in zip(idx, enc["input_ids"], enc["offset_mapping"], strict=True):
            spans = rendered[i][1]  # type: ignore[index]
            out[i] = (list(ids), labels_from_offsets(ids, offsets, spans))
    return out
