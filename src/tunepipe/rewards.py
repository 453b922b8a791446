"""Reward functions for the grpo stage, built from the `grpo.rewards` list, in TRL's reward signature.

TRL's GRPOTrainer calls each as `fn(prompts=..., completions=..., completion_ids=..., **columns)`
(columns: the dataset's other columns, one value per completion, plus `trainer_state`, `log_extra` and
`log_metric`) and takes one float (or None: not scored) per completion. It logs each one as
`rewards/<fn.__name__>/mean` and `/std`, so every function here has its own name.

- tunepipe's metrics (exact_match, numeric_match, regex_match, contains, rouge_l): the completion's text,
  thinking removed, scored against the row's `answer` as the eval stage scores a reply.
- format: 1.0 when the completion's text (thinking included) matches `pattern` from its start.
- length: 0 up to `target` characters, then falling linearly to -1 at 2 x target (and below: -1).
- `module:function`: your own function, imported with the config's folder first on sys.path and called
  with TRL's arguments as they are.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import metrics

if TYPE_CHECKING:
    from .stages.grpo import Reward

RewardFunc = Callable[..., list[float | None]]
METRIC_REWARDS = ("exact_match", "numeric_match", "regex_match", "contains", "rouge_l")


def completion_text(completion: Any, with_thinking: bool = True) -> str:
    """The text of a completion: a string as it is, or (conversational prompts) the assistant message's
    content. A chat template's response parser may have moved the thinking into its own field: with
    `with_thinking` it is put back as `<think>...</think>` in front, as the model wrote it."""
    if isinstance(completion, str):
        return completion
    messages = [completion] if isinstance(completion, dict) else list(completion)
    reply = next(
        (m for m in reversed(messages) if m.get("role") == "assistant"), messages[-1] if messages else {}
    )
    content = reply.get("content") or ""
    if isinstance(content, list):  # content parts: the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    thinking = reply.get("reasoning_content") or reply.get("thinking")
    if with_thinking and thinking and "<think>" not in content:
        content = f"<think>{thinking}</think>\n{content}"
    return str(content)


def reward_functions(rewards: list[Reward], base_dir: Path) -> list[RewardFunc]:
    """One TRL reward function per entry of `grpo.rewards`, in order, each with a distinct `__name__`
    (the second `regex_match` is `regex_match_2`)."""
    funcs: list[RewardFunc] = []
    seen: dict[str, int] = {}
    for r in rewards:
        fn = _build(r, base_dir)
        name = r.name.split(":", 1)[1] if ":" in r.name else r.name
        seen[name] = seen.get(name, 0) + 1
        funcs.append(_named(fn, name if seen[name] == 1 else f"{name}_{seen[name]}"))
    return funcs


def reward_weights(rewards: list[Reward]) -> list[float]:
    """GRPOConfig.reward_weights: the weighted sum of the rewards is the one GRPO normalises per group."""
    return [r.weight for r in rewards]


def _named(fn: RewardFunc, name: str) -> RewardFunc:
    # A wrapper, not fn.__name__ = name: a user's function is left as it is. TRL runs async rewards
    # concurrently, recognised by their coroutine function: an async one stays async.
    if inspect.iscoroutinefunction(fn):

        async def reward(**kwargs: Any) -> list[float | None]:
            return await fn(**kwargs)
    else:

        def reward(**kwargs: Any) -> list[float | None]:  # type: ignore[misc]
            return fn(**kwargs)

    reward.__name__ = reward.__qualname__ = name
    return reward


def _build(r: Reward, base_dir: Path) -> RewardFunc:
    if r.name in METRIC_REWARDS:
        scorer = metrics.scorer_for(r.name, regex=r.pattern, tolerance=r.tolerance, base_dir=base_dir)
        return _against_answer(r.name, scorer)
    if r.name == "format":
        assert r.pattern is not None  # Reward requires it
        return _format(re.compile(r.pattern, re.DOTALL))
    if r.name == "length":
        return _length(r.target)
    return _load_user_reward(r.name, base_dir)


def _against_answer(name: str, scorer: metrics.Scorer) -> RewardFunc:
    def reward(completions: list[Any], answer: list[Any] | None = None, **_: Any) -> list[float | None]:
        if answer is None:
            raise ValueError(
                f"reward {name} scores completions against the `answer` column, and the grpo data has none "
                "(the data stage writes it from the prompt rows' reference answers)"
            )
        return [
            metrics.score(scorer, metrics.strip_thinking(completion_text(c, with_thinking=False)), str(a))
            for c, a in zip(completions, answer, strict=True)
        ]

    return reward


def _format(pattern: re.Pattern[str]) -> RewardFunc:
    def reward(completions: list[Any], **_: Any) -> list[float | None]:
        return [1.0 if pattern.match(completion_text(c)) else 0.0 for c in completions]

    return reward


def _length(target: int) -> RewardFunc:
    def reward(completions: list[Any], **_: Any) -> list[float | None]:
        out: list[float | None] = []
        for c in completions:
            n = len(completion_text(c))
            out.append(-min(1.0, max(0.0, (n - target) / target)))
        return out

    return reward


def _load_user_reward(spec: str, base_dir: Path) -> RewardFunc:
    """`module:function` -> the function, the config's folder searched first (as metrics.load_user_scorer
    imports a user scorer); called with TRL's reward arguments."""
    from .usercode import user_function

    return user_function(spec, base_dir, "reward")
