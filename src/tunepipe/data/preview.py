"""`tunepipe data CONFIG --preview N`: prepared examples with the trained tokens marked."""

from __future__ import annotations

from typing import Any

from .chat import IGNORE_INDEX, tokenize_conversation

OPEN, CLOSE = "[[", "]]"


def _runs(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    runs: list[tuple[bool, list[int]]] = []
    for i, lab in zip(ids, labels, strict=True):
        trained = lab != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(i)
        else:
            runs.append((trained, [i]))
    return runs


def render_marked(tok: Any, ids: list[int], labels: list[int], style: str | None = None) -> str:
    """The text with trained spans as [[...]] (plain) or wrapped in rich markup `style` (a TTY)."""
    from rich.markup import escape

    parts = []
    for trained, run in _runs(ids, labels):
        text = tok.decode(run)
        if style:
            text = escape(text)
            parts.append(f"[{style}]{text}[/{style}]" if trained else f"[dim]{text}[/dim]")
        else:
            parts.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(parts)


def preview(
    tok: Any,
    splits: dict[str, list[dict[str, Any]]],
    n: int,
    style: str | None = None,
    enable_thinking: bool | None = None,
) -> list[str]:
    """Up to n examples from each training split, each with its token counts."""
    out = []
    for name, rows in splits.items():
        for k, row in enumerate(rows[:n], 1):
            if "input_ids" in row:  # conversations: the tokens as the trainer sees them
                out.append(_block(tok, f"{name} #{k}", row["input_ids"], row["labels"], style))
                continue
            if "chosen" in row:  # a pair: both sides, the reply trained
                sides = [(side, row["prompt"] + row[side]) for side in ("chosen", "rejected")]
            elif "label" in row:  # unpaired feedback: the completion, desirable or not
                sides = [("desirable" if row["label"] else "undesirable", row["prompt"] + row["completion"])]
            else:  # a prompt and its reference answer (sampled completions are scored against it)
                sides = [("prompt + reference answer", row["messages"])]
            for side, msgs in sides:
                ids, labels = tokenize_conversation(
                    tok, msgs, train_on="last", enable_thinking=enable_thinking
                )
                out.append(_block(tok, f"{name} #{k} ({side})", ids, labels, style))
    return out


def _block(tok: Any, title: str, ids: list[int], labels: list[int], style: str | None) -> str:
    trained = sum(lab != IGNORE_INDEX for lab in labels)
    head = f"--- {title}: {len(ids)} tokens, {trained} trained"
    return f"{head}\n{render_marked(tok, ids, labels, style)}"
