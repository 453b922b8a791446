"""Secrets never reach the run folder: redaction by key name and by value pattern.

A value is hidden when its key *is* a secret's name (`hf_token`, `api_key`, `password`, ...: whole
name parts, so `max_new_tokens` or `tokenizer` stay visible), when it looks like a credential
(Hugging Face, OpenAI, GitHub, AWS, Slack tokens, bearer headers, JWTs), or when it is the value of a
secret-named environment variable of this process (HF_TOKEN, WANDB_API_KEY, ...). Everything written
for people to read — config.resolved.yaml, logs, reports — goes through `redact_text` or `redact`.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"

# Name parts (split on _ - . and camelCase) that make a key or variable secret on their own.
_SECRET_PARTS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials"}
# Parts that are secret only after a qualifier: api_key, access_key, private_key, auth_key ...
_KEY_QUALIFIERS = {"api", "access", "private", "secret", "auth", "signing", "encryption", "client"}

_VALUE_PATTERNS = re.compile(
    r"|".join(
        [
            r"\bhf_[A-Za-z0-9]{20,}",  # Hugging Face
            r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}",  # OpenAI / Anthropic
            r"\b(?:ghp|gho|ghs|ghu|ghr)_[A-Za-z0-9]{30,}",  # GitHub
            r"\bgithub_pat_[A-Za-z0-9_]{30,}",
            r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
            r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
            r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
            r"(?<=[Bb]earer )[A-Za-z0-9._~+/-]{16,}=*",
        ]
    )
)


def _parts(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [p for p in re.split(r"[_\-.\s]+", spaced.lower()) if p]


def is_secret_name(name: str) -> bool:
    """`hf_token`, `WANDB_API_KEY`, `apiKey`, `password` -> True; `max_new_tokens`, `tokenizer`,
    `key`, `sort_keys` -> False."""
    parts = _parts(str(name))
    if any(p in _SECRET_PARTS for p in parts):
        return True
    return any(p == "key" and i > 0 and parts[i - 1] in _KEY_QUALIFIERS for i, p in enumerate(parts))


def _env_secrets() -> list[str]:
    """Values of this process's secret-named environment variables (long enough to be a secret)."""
    vals = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 8}
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str) -> str:
    """Credentials in free text (log lines, a project goal, a report page) replaced by ***."""
    if not text:
        return text
    for v in _env_secrets():
        text = text.replace(v, MASK)
    return _VALUE_PATTERNS.sub(MASK, text)


def redact(obj: Any) -> Any:
    """A config dump (dicts, lists, strings) with secret-named keys and credential values hidden."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_name(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
