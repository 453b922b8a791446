"""Record formats: detection and conversion to the two internal forms.

- a conversation: a list of {"role", "content"} messages (SFT);
- a preference pair: {"prompt": messages, "chosen": messages, "rejected": messages} (DPO).

Every problem is a RowError whose message names the field and the fix; the caller adds file and line.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
Conversation = list[Message]

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function": "tool",
    "observation": "tool",
    "tool": "tool",
}

SFT_FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca")
PREFERENCE_FORMATS = ("preference",)


class RowError(ValueError):
    """One bad row: the message names the field and what is wrong with it."""


def detect_format(record: dict[str, Any], columns: dict[str, str]) -> str:
    """The format of one record, from the fields it has (after column renaming)."""
    keys = set(record) | set(columns)
    if {"chosen", "rejected"} <= keys and "prompt" in keys:
        return "preference"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise RowError(
        f"unknown data format: fields {sorted(record)}; expected one of: messages (chat), "
        "conversations (ShareGPT), prompt + completion, instruction + output (alpaca), "
        "prompt + chosen + rejected (preference). Set `format:` and `columns:` on the source to map yours."
    )


def _field(record: dict[str, Any], name: str, columns: dict[str, str], required: bool = True) -> Any:
    key = columns.get(name, name)
    if key not in record or record[key] is None:
        if required:
            raise RowError(f"missing field '{key}'")
        return None
    return record[key]


def _check_messages(msgs: Any, field: str) -> Conversation:
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"{field}: expected a non-empty list of {{role, content}} messages")
    out: Conversation = []
    for i, m in enumerate(msgs):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(f"{where}: expected an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError(f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise RowError(f"{where}.content: expected a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise RowError(f"{where}.content: empty assistant response")
        out.append({"role": role, "content": content})
    return out


def _as_messages(value: Any, field: str, role: str) -> Conversation:
    """A string becomes one message with `role`; a list is checked as messages."""
    if isinstance(value, str):
        if role == "assistant" and not value.strip():
            raise RowError(f"{field}: empty assistant response")
        return [{"role": role, "content": value}]
    return _check_messages(value, field)


def to_conversation(record: dict[str, Any], fmt: str, columns: dict[str, str]) -> Conversation:
    if fmt == "messages":
        conv = _check_messages(_field(record, "messages", columns), columns.get("messages", "messages"))
    elif fmt == "sharegpt":
        key = columns.get("conversations", "conversations")
        turns = _field(record, "conversations", columns)
        if not isinstance(turns, list) or not turns:
            raise RowError(f"{key}: expected a non-empty list of {{from, value}} turns")
        conv = []
        system = record.get(columns.get("system", "system"))
        if isinstance(system, str) and system.strip():
            conv.append({"role": "system", "content": system})
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise RowError(f"{key}[{i}]: expected an object with from and value")
            role = SHAREGPT_ROLES.get(str(t.get("from")))
            if role is None:
                raise RowError(
                    f"{key}[{i}].from: unknown role {t.get('from')!r} "
                    f"(expected one of {', '.join(SHAREGPT_ROLES)})"
                )
            conv.append({"role": role, "content": t.get("value")})
        conv = _check_messages(conv, key)
    elif fmt == "prompt_completion":
        conv = _as_messages(_field(record, "prompt", columns), columns.get("prompt", "prompt"), "user")
        conv += _as_messages(
            _field(record, "completion", columns), columns.get("completion", "completion"), "assistant"
        )
    elif fmt == "alpaca":
        instruction = _field(record, "instruction", columns)
        extra = _field(record, "input", columns, required=False)
        output = _field(record, "output", columns)
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise RowError("instruction and output must be strings")
        prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        system = _field(record, "system", columns, required=False)
        conv = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
        conv += [{"role": "user", "content": prompt}]
        conv += _as_messages(output, columns.get("output", "output"), "assistant")
    else:
        raise RowError(
            f"format {fmt!r} is not a conversation format (expected one of {', '.join(SFT_FORMATS)})"
        )
    if not any(m["role"] == "assistant" for m in conv):
        raise RowError("no assistant turn: nothing to train on")
    return conv


def to_preference(record: dict[str, Any], fmt: str, columns: dict[str, str]) -> dict[str, Conversation]:
    if fmt != "preference":
        raise RowError(
            f"format {fmt!r} is not a preference format: DPO data needs prompt, chosen and rejected"
        )
    prompt = _as_messages(_field(record, "prompt", columns), columns.get("prompt", "prompt"), "user")
    chosen = _as_messages(_field(record, "chosen", columns), columns.get("chosen", "chosen"), "assistant")
    rejected = _as_messages(
        _field(record, "rejected", columns), columns.get("rejected", "rejected"), "assistant"
    )
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in msgs):
            raise RowError(f"{columns.get(name, name)}: no assistant message")
    if chosen == rejected:
        raise RowError("chosen is identical to rejected: the pair teaches nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
