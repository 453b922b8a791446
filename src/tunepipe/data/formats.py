"""Record formats: detection and conversion to the internal forms.

- a conversation: a list of {"role", "content"} messages (SFT), `reasoning_content` kept;
- plain text for language modelling: {"text": str} (SFT, every token trained);
- a preference pair: {"prompt": messages, "chosen": messages, "rejected": messages} (DPO);
- unpaired feedback: {"prompt": messages, "completion": messages, "label": bool} (KTO): one completion
  with a thumbs up (true) or down (false); a preference pair gives two such rows.

`columns` maps the canonical field names to the user's (`{prompt: question, response: answer}`).
Every problem is a RowError whose message names the field (as the user calls it) and the fix; the
caller adds file and line.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

Message = dict[str, Any]
Conversation = list[Message]

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "function": "tool",
    "observation": "tool",
    "tool": "tool",
}
# Message fields passed to the chat template besides role and content.
EXTRA_MESSAGE_FIELDS = ("reasoning_content", "tool_calls", "name", "tool_call_id")

SFT_FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca", "text")
PREFERENCE_FORMATS = ("preference", "preference_implicit", "sharegpt_preference")
UNPAIRED_FORMATS = ("unpaired",)
FORMATS = SFT_FORMATS + PREFERENCE_FORMATS + UNPAIRED_FORMATS
# What each format needs, in canonical names; shown when detection fails.
SIGNATURES = {
    "messages": "messages: [{role, content}, ...]",
    "sharegpt": "conversations: [{from, value}, ...] (+ system)",
    "prompt_completion": "prompt + completion (strings or message lists)",
    "alpaca": "instruction + output (+ input, system, history)",
    "text": "text (language modelling, every token trained)",
    "preference": "prompt + chosen + rejected",
    "preference_implicit": "chosen + rejected: whole conversations sharing the prompt",
    "sharegpt_preference": "conversations + chosen + rejected ({from, value} objects)",
    "unpaired": "prompt + completion + label, or messages + label (label: true = good, false = bad)",
}
# Canonical names users often map with a different word.
SYNONYMS = {"response": "completion", "answer": "completion", "question": "prompt", "query": "prompt"}


class RowError(ValueError):
    """One bad row: the message names the field and what is wrong with it."""


class FormatError(ValueError):
    """A source whose format cannot be told (unknown or ambiguous): the message lists the choices."""


class Fields:
    """A record seen through the column mapping: canonical name -> value, with the user's names for errors."""

    def __init__(self, record: dict[str, Any], columns: dict[str, str]):
        self.record = record
        self.names: dict[str, str] = {}
        for canon, user in columns.items():
            self.names[SYNONYMS.get(canon, canon)] = user
        # The output field of alpaca and the completion of prompt/completion are both "the response".
        if "completion" in self.names and "output" not in self.names:
            self.names["output"] = self.names["completion"]

    def name(self, canon: str) -> str:
        return self.names.get(canon, canon)

    def has(self, canon: str) -> bool:
        return self.record.get(self.name(canon)) is not None

    def keys(self) -> set[str]:
        mapped = set(self.names.values())
        return {c for c in self.names if self.has(c)} | {k for k in self.record if k not in mapped}

    def get(self, canon: str, required: bool = True) -> Any:
        value = self.record.get(self.name(canon))
        if value is None and required:
            raise RowError(f"missing field '{self.name(canon)}'")
        return value


def candidates(record: dict[str, Any], columns: dict[str, str]) -> list[str]:
    """Every format this record fits."""
    f = Fields(record, columns)
    keys = f.keys()
    out = []
    if {"chosen", "rejected"} <= keys:
        if "conversations" in keys:
            out.append("sharegpt_preference")
        elif "prompt" in keys:
            out.append("preference")
        else:
            out.append("preference_implicit")
        return out
    # Only a yes/no label makes feedback: a category column called `label` stays SFT data.
    feedback = "label" in keys and _label_value(f.get("label", required=False)) is not None
    if feedback and ({"prompt", "completion"} <= keys or "messages" in keys):
        return ["unpaired"]
    if "messages" in keys:
        out.append("messages")
    if "conversations" in keys:
        out.append("sharegpt")
    if "prompt" in keys and "completion" in keys:
        out.append("prompt_completion")
    if "instruction" in keys and "output" in keys:
        out.append("alpaca")
    if not out and "text" in keys:
        out.append("text")
    return out


def _choices() -> str:
    return "\n".join(f"    format: {f:20s} {SIGNATURES[f]}" for f in FORMATS)


def detect_format(records: list[dict[str, Any]], columns: dict[str, str], where: str) -> str:
    """The main format of a source, from its first records. Unknown or ambiguous -> FormatError."""
    seen: Counter[str] = Counter()
    fields: set[str] = set()
    for rec in records:
        fields |= set(rec)
        c = candidates(rec, columns)
        if len(c) > 1:
            raise FormatError(
                f"{where}: ambiguous data format: the columns {sorted(rec)} fit {', '.join(c)}. "
                f"Set `format:` on the source to one of:\n{_choices()}"
            )
        if c:
            seen[c[0]] += 1
    if not seen:
        raise FormatError(
            f"{where}: unknown data format: the columns are {sorted(fields)}. Map them with `columns:` "
            "(e.g. `columns: {prompt: question, completion: answer}`) or set `format:` to one of:\n"
            f"{_choices()}"
        )
    return seen.most_common(1)[0][0]  # rows that fit another format are converted as that one


def _check_messages(msgs: Any, field: str, need_assistant_content: bool = True) -> Conversation:
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
        if role == "assistant" and m.get("tool_calls") and not content:
            content = ""  # a pure tool call: the call is what is trained
        elif not isinstance(content, str):
            raise RowError(f"{where}.content: expected a string, got {type(content).__name__}")
        elif role == "assistant" and need_assistant_content and not content.strip():
            raise RowError(f"{where}.content: empty assistant response")
        msg: Message = {"role": role, "content": content}
        msg.update({k: m[k] for k in EXTRA_MESSAGE_FIELDS if m.get(k) is not None})
        out.append(msg)
    return out


def _as_messages(value: Any, field: str, role: str) -> Conversation:
    """A string becomes one message with `role`; a list is checked as messages."""
    if isinstance(value, str):
        if role == "assistant" and not value.strip():
            raise RowError(f"{field}: empty assistant response")
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        hint = ' (a number: store it as text, e.g. "5")' if type(value) in (int, float) else ""
        raise RowError(
            f"{field}: expected a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}{hint}"
        )
    return _check_messages(value, field)


def _sharegpt_turns(turns: Any, field: str) -> Conversation:
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        raise RowError(f"{field}: expected a non-empty list of {{from, value}} turns")
    conv: Conversation = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError(f"{field}[{i}]: expected an object with from and value, got {type(t).__name__}")
        role = SHAREGPT_ROLES.get(str(t.get("from")))
        if role is None:
            raise RowError(
                f"{field}[{i}].from: unknown role {t.get('from')!r} "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        conv.append({"role": role, "content": t.get("value")})
    return _check_messages(conv, field)


def _system(f: Fields) -> Conversation:
    system = f.get("system", required=False)
    return [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []


# The role each turn may follow in an SFT conversation (None: the first turn). A tool result follows
# an assistant turn (the call: `tool_calls`, or sharegpt's function_call) or another tool result.
_MAY_FOLLOW: dict[str, tuple[str | None, ...]] = {
    "system": (None,),
    "user": (None, "system", "assistant"),
    "assistant": ("user", "tool"),
    "tool": ("assistant", "tool"),
}


def check_turn_order(conv: Conversation, field: str, skip: int = 0) -> None:
    """The one place SFT conversations are checked for order: a system turn only first, then the user,
    user and assistant alternating (tool results after the assistant's call), the assistant last.
    Chat templates render anything, so a malformed dialogue would otherwise be trained as it is.
    `skip`: turns added in front of the user's (a `system` field), left out of the turn numbers."""
    prev: str | None = None
    for i, m in enumerate(conv):
        role, n = m["role"], i + 1 - skip
        if prev not in _MAY_FOLLOW[role]:
            if role == "system":
                why = "a system turn comes only first"
            elif prev in (None, "system"):
                why = "the first turn after the system prompt must be the user's"
            elif role == "tool":
                why = "a tool result must follow the assistant turn that called the tool"
            elif prev == "tool":
                why = "the assistant replies to a tool result (or another tool result follows)"
            else:
                why = "user and assistant turns must alternate"
            after = f", after {prev!r}" if prev else ""
            raise RowError(f"{field}: turn {n} is {role!r}{after}: {why}")
        prev = role
    if prev != "assistant":
        raise RowError(
            f"{field}: the last turn (turn {len(conv) - skip}) is {prev!r}: an SFT conversation must end "
            "with the assistant's reply"
        )


def to_conversation(record: dict[str, Any], fmt: str, columns: dict[str, str]) -> Conversation:
    f = Fields(record, columns)
    label, skip = "conversation", 0  # what the turn numbers of an order error count
    if fmt == "messages":
        conv = _check_messages(f.get("messages"), f.name("messages"))
        label = f.name("messages")
    elif fmt == "sharegpt":
        turns = _sharegpt_turns(f.get("conversations"), f.name("conversations"))
        conv = ([] if turns[0]["role"] == "system" else _system(f)) + turns
        label, skip = f.name("conversations"), len(conv) - len(turns)
    elif fmt == "prompt_completion":
        conv = _system(f)
        label, skip = f"{f.name('prompt')} + {f.name('completion')}", len(conv)
        conv += _as_messages(f.get("prompt"), f.name("prompt"), "user")
        conv += _as_messages(f.get("completion"), f.name("completion"), "assistant")
    elif fmt == "alpaca":
        instruction, extra, output = f.get("instruction"), f.get("input", required=False), f.get("output")
        for canon, value in (("instruction", instruction), ("output", output)):
            if not isinstance(value, str):
                raise RowError(f"{f.name(canon)}: expected a string, got {type(value).__name__}")
        if extra is not None and not isinstance(extra, str):
            raise RowError(f"{f.name('input')}: expected a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        conv = _system(f)
        history = f.get("history", required=False) or []
        if not isinstance(history, list):
            raise RowError(f"{f.name('history')}: expected a list of [instruction, response] pairs")
        for i, pair in enumerate(history):
            if not (
                isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            ):
                raise RowError(
                    f"{f.name('history')}[{i}]: expected an [instruction, response] pair of strings"
                )
            conv += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        conv += [{"role": "user", "content": prompt}]
        conv += _as_messages(output, f.name("output"), "assistant")
    else:
        raise RowError(
            f"format {fmt!r} is not a conversation format (expected one of {', '.join(SFT_FORMATS)})"
        )
    if not any(m["role"] == "assistant" for m in conv):
        raise RowError("no assistant turn: nothing to train on")
    check_turn_order(conv, label, skip)
    return conv


def to_text(record: dict[str, Any], columns: dict[str, str]) -> str:
    f = Fields(record, columns)
    text = f.get("text")
    if not isinstance(text, str):
        raise RowError(f"{f.name('text')}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise RowError(f"{f.name('text')}: empty text")
    return text


def _split_shared_prefix(chosen: Conversation, rejected: Conversation) -> int:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def to_preference(record: dict[str, Any], fmt: str, columns: dict[str, str]) -> dict[str, Conversation]:
    f = Fields(record, columns)
    if fmt == "preference":
        prompt = _as_messages(f.get("prompt"), f.name("prompt"), "user")
        chosen = _as_messages(f.get("chosen"), f.name("chosen"), "assistant")
        rejected = _as_messages(f.get("rejected"), f.name("rejected"), "assistant")
        prompt = _system(f) + prompt if prompt[0]["role"] != "system" else prompt
    elif fmt == "preference_implicit":
        full_c, full_r = f.get("chosen"), f.get("rejected")
        if isinstance(full_c, str) or isinstance(full_r, str):
            raise RowError(
                f"{f.name('chosen')}/{f.name('rejected')} are plain strings without a prompt: "
                "add a 'prompt' field, or give whole conversations (message lists) that share the prompt"
            )
        full_c = _check_messages(full_c, f.name("chosen"))
        full_r = _check_messages(full_r, f.name("rejected"))
        n = _split_shared_prefix(full_c, full_r)
        # The prompt is the shared prefix up to the last turn before the replies diverge.
        while n > 0 and full_c[n - 1]["role"] == "assistant":
            n -= 1
        if n == 0:
            raise RowError(f"{f.name('chosen')} and {f.name('rejected')} share no prompt turns")
        prompt, chosen, rejected = full_c[:n], full_c[n:], full_r[n:]
    elif fmt == "sharegpt_preference":
        prompt = _sharegpt_turns(f.get("conversations"), f.name("conversations"))
        prompt = ([] if prompt[0]["role"] == "system" else _system(f)) + prompt
        chosen = _sharegpt_turns(f.get("chosen"), f.name("chosen"))
        rejected = _sharegpt_turns(f.get("rejected"), f.name("rejected"))
    else:
        raise RowError(
            f"format {fmt!r} is not a preference format: DPO data needs prompt, chosen and rejected "
            f"(one of {', '.join(PREFERENCE_FORMATS)})"
        )
    for canon, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise RowError(f"{f.name(canon)}: no assistant turn after the prompt")
    if chosen == rejected:
        raise RowError("chosen is identical to rejected: the pair teaches nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# --------------------------------------------------------------------------- unpaired feedback (KTO)

# A label is a thumbs up (true: a desirable completion) or down (false). JSON booleans, the numbers 1
# and 0, and these words in any case (CSV cells and exports from feedback tools are text).
LABEL_WORDS = {
    "true": True,
    "yes": True,
    "up": True,
    "1": True,
    "false": False,
    "no": False,
    "down": False,
    "0": False,
}


def _label_value(value: Any) -> bool | None:
    """True / False for an accepted label value, None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return LABEL_WORDS.get(value.strip().lower())
    return None


def parse_label(value: Any, field: str = "label") -> bool:
    label = _label_value(value)
    if label is None:
        raise RowError(
            f"{field}: {value!r} is not a thumbs up or down; use true or false "
            '(also accepted: 1/0, "yes"/"no", "up"/"down")'
        )
    return label


def _unpaired_row(prompt: Conversation, completion: Conversation, label: bool) -> dict[str, Any]:
    return {"prompt": prompt, "completion": completion, "label": label}


def to_unpaired(record: dict[str, Any], fmt: str, columns: dict[str, str]) -> list[dict[str, Any]]:
    """A record -> rows of {"prompt": messages, "completion": messages, "label": bool} (KTO).

    A preference pair gives two rows: chosen with label true, rejected with label false. Unpaired
    feedback (format unpaired, or prompt_completion / messages with a label) gives one: prompt +
    completion, or messages whose last assistant turn is the completion. A string prompt becomes a
    user turn (plus `system`, if given)."""
    if fmt in PREFERENCE_FORMATS:
        pair = to_preference(record, fmt, columns)
        return [
            _unpaired_row(pair["prompt"], pair["chosen"], True),
            _unpaired_row(pair["prompt"], pair["rejected"], False),
        ]
    f = Fields(record, columns)
    if fmt not in ("unpaired", "prompt_completion", "messages"):
        raise RowError(
            f"a {fmt} row in unpaired feedback data: give prompt + completion + label, messages + label, "
            f"or preference pairs (one of {', '.join(PREFERENCE_FORMATS)})"
        )
    if not f.has("label"):
        raise RowError(
            f"no `{f.name('label')}`: unpaired feedback needs {f.name('label')} true/false (thumbs up/down) "
            "with each completion; map another column with columns: {label: your_column}, "
            "or give preference pairs (prompt/chosen/rejected)"
        )
    label = parse_label(f.get("label"), f.name("label"))
    if fmt == "messages" or (fmt == "unpaired" and not (f.has("prompt") and f.has("completion"))):
        msgs = _check_messages(f.get("messages"), f.name("messages"))
        where = f.name("messages")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        if last == -1:
            raise RowError(f"{where}: no assistant turn: the last assistant turn is the completion")
        if last != len(msgs) - 1:
            raise RowError(
                f"{where}: turns after the last assistant turn ({msgs[-1]['role']!r}): "
                "the conversation must end with the rated completion"
            )
        prompt, completion, skip = msgs[:last], msgs[last:], 0
    else:
        where = f"{f.name('prompt')} + {f.name('completion')}"
        prompt = _as_messages(f.get("prompt"), f.name("prompt"), "user")
        completion = _as_messages(f.get("completion"), f.name("completion"), "assistant")
        if prompt[0]["role"] != "system":
            system = _system(f)
            prompt, skip = system + prompt, len(system)
        else:
            skip = 0
        if completion[-1]["role"] != "assistant":
            raise RowError(f"{f.name('completion')}: the last turn must be the assistant's rated completion")
    if not any(m["role"] == "user" for m in prompt):
        raise RowError(f"{where}: no user turn before the completion: nothing to answer")
    check_turn_order(prompt + completion, where, skip)
    return [_unpaired_row(prompt, completion, label)]
