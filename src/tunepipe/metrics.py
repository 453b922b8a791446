"""Scorers for generated replies: each takes (prediction, reference) and returns a score in [0, 1].

Pure functions, no model: the eval stage generates, these score. User scorers are plain functions
named in the config as `module:function` (the module is imported from the config's folder first)
and are called the same way.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

Scorer = Callable[[str, str], float]

_THINK = re.compile(r"<think>.*?(?:</think>|$)\s*", re.DOTALL)
# An optional sign, digits with optional thousands separators, an optional fraction and exponent.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")


def normalise(text: str) -> str:
    """Whitespace collapsed and trimmed: formatting noise is not an error, case and wording are."""
    return " ".join(text.strip().split())


def strip_thinking(text: str) -> str:
    """Remove <think>...</think> blocks (and an unterminated one at the end, cut by max_new_tokens)."""
    return _THINK.sub("", text).strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def contains(prediction: str, reference: str) -> float:
    """The reference appears in the output (case-insensitive): for answers wrapped in a sentence."""
    return float(normalise(reference).casefold() in normalise(prediction).casefold())


def _extract(pattern: re.Pattern[str], text: str) -> str | None:
    m = pattern.search(text)
    if m is None:
        return None
    return m.group(1) if pattern.groups else m.group(0)


def regex_match(prediction: str, reference: str, pattern: str) -> float:
    """Extract the answer with `pattern` (its first group if it has one) and compare it with the
    reference; when the reference also matches the pattern, its extraction is compared instead.
    No match in the output scores 0."""
    rx = re.compile(pattern)
    got = _extract(rx, prediction)
    if got is None:
        return 0.0
    want = _extract(rx, reference)
    return float(normalise(got) == normalise(want if want is not None else reference))


def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUMBER.finditer(text):
        s = m.group(0).replace(",", "")
        if any(c.isdigit() for c in s):
            try:
                out.append(float(s))
            except ValueError:
                continue
    return out


def numeric_match(prediction: str, reference: str, tolerance: float = 1e-6) -> float:
    """The last number in the output equals the last number in the reference, within `tolerance`
    (absolute, or relative to the reference for large values). "1,234.0" reads as 1234."""
    got, want = _numbers(prediction), _numbers(reference)
    if not got or not want:
        return 0.0
    return float(math.isclose(got[-1], want[-1], rel_tol=tolerance, abs_tol=tolerance))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words: longest common subsequence against both lengths."""
    p, r = prediction.lower().split(), reference.lower().split()
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def load_user_scorer(spec: str, base_dir: Path) -> Scorer:
    """`module:function` -> the function; the config's folder is searched first so a project's own
    `scorers.py` next to tunepipe.yaml works without installing anything."""
    from .usercode import user_function

    fn = user_function(spec, base_dir, "metric")
    if len(inspect.signature(fn).parameters) < 2:
        raise ValueError(f"metric {spec!r}: the scorer must take (prediction, reference)")
    return fn


def metric_key(name: str) -> str:
    """The name a metric has in metrics.json: built-ins as is, `module:function` by its function."""
    return name.split(":", 1)[1] if ":" in name else name


def scorer_for(name: str, *, regex: str | None, tolerance: float, base_dir: Path) -> Scorer:
    builtin: dict[str, Scorer] = {"exact_match": exact_match, "contains": contains, "rouge_l": rouge_l}
    if name in builtin:
        return builtin[name]
    if name == "regex_match":
        assert regex is not None  # the config requires it
        return partial(regex_match, pattern=regex)
    if name == "numeric_match":
        return partial(numeric_match, tolerance=tolerance)
    return load_user_scorer(name, base_dir)


def score(fn: Scorer, prediction: str, reference: str) -> float:
    """A scorer's result as a float; a user scorer returning None or a non-number is an error."""
    value: Any = fn(prediction, reference)
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"scorer {getattr(fn, '__name__', fn)!r} returned {value!r}; return a number")
    return float(value)
