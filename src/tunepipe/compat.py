"""The one place that knows library-version differences (transformers, TRL, PEFT).

Callers describe what they want with today's names; this module passes what the installed version
accepts, renames what moved, and reports what it had to drop instead of crashing on
`unexpected keyword argument`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

# new name -> older names that the same setting had in earlier releases
RENAMED = {
    "max_length": ("max_seq_length",),
    "eval_strategy": ("evaluation_strategy",),
    "processing_class": ("tokenizer",),
    "dtype": ("torch_dtype",),
    "activation_checkpointing": ("gradient_checkpointing",),
    "activation_checkpointing_kwargs": ("gradient_checkpointing_kwargs",),
}


def accepted_names(target: Callable[..., Any] | type) -> set[str] | None:
    """Parameter names `target` accepts; None when it takes **kwargs (anything goes)."""
    if dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target)}
    sig = inspect.signature(target)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return set(sig.parameters)


def adapt_kwargs(
    target: Callable[..., Any] | type, kwargs: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Keep what `target` accepts, rename what moved; returns (kwargs, names dropped)."""
    names = accepted_names(target)
    if names is None:
        return dict(kwargs), []
    out, dropped = {}, []
    for key, value in kwargs.items():
        if key in names:
            out[key] = value
            continue
        old = next((o for o in RENAMED.get(key, ()) if o in names), None)
        if old:
            out[old] = value
        else:
            dropped.append(key)
    return out, dropped


def warmup_kwargs(config_cls: type, ratio: float) -> dict[str, Any]:
    """transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio)."""
    names = accepted_names(config_cls) or set()
    return {"warmup_ratio": ratio} if "warmup_ratio" in names else {"warmup_steps": ratio}


def sampling_kwargs(config_cls: type, strategy: str) -> dict[str, Any]:
    """The train sampler: `train_sampling_strategy` (random | sequential | group_by_length) since
    transformers 5.x; before, only `group_by_length` (and no sequential: random is used then)."""
    names = accepted_names(config_cls) or set()
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": strategy}
    return {"group_by_length": strategy == "group_by_length"} if "group_by_length" in names else {}


def build(target: Callable[..., Any] | type, log: Callable[[str], None] | None = None, **kwargs: Any) -> Any:
    """Call `target` with the kwargs the installed version accepts, logging any dropped."""
    good, dropped = adapt_kwargs(target, kwargs)
    if dropped and log:
        name = getattr(target, "__name__", str(target))
        log(f"compat: {name} in the installed version does not take {', '.join(dropped)}; ignored")
    return target(**good)


def version_tuple(package: str) -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        raw = version(package)
    except PackageNotFoundError:
        return ()
    parts = []
    for piece in raw.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """from_pretrained takes `dtype` since transformers 4.56 and `torch_dtype` before."""
    return {"dtype": dtype} if version_tuple("transformers") >= (4, 56) else {"torch_dtype": dtype}
