"""The one place that knows library-version differences (transformers, TRL, PEFT).

Callers describe what they want with today's names; this module passes what the installed version
accepts, renames what moved, and reports what it had to drop instead of crashing on
`unexpected keyword argument`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def lm_head_on_loss_positions(
    enabled: bool = True, log: Callable[[str], None] | None = None
) -> Iterator[bool]:
    """While active, TRL's fused LM head projects only the loss-bearing positions through the vocabulary
    on CPU too; yields whether that applies.

    TRL >= 1.x scores tokens through `add_fused_lm_head` (SFTTrainer, DPOTrainer). It projects only the
    positions whose label is not -100 where Triton runs (CUDA, XPU) and every position elsewhere, so that
    compiled backends (Neuron) see fixed tile shapes. On CPU that means the prompt, the padding and, with
    assistant-only loss, the user turns all go through the [hidden x vocabulary] projection and its
    backward. CPU compiles nothing: there the compact path gives the same values (masked positions are 0
    either way) for less work. The switch is TRL's own decision function (`_use_triton` as read by
    `add_fused_lm_head`), extended to CPU while the context is open and restored after; a TRL whose head
    is built differently is left alone (yields False).
    """
    utils: Any = None
    if enabled:
        try:
            from trl.trainer import utils
        except ImportError:  # TRL without the fused head: nothing to switch
            utils = None
    original = getattr(utils, "_use_triton", None)
    head = getattr(utils, "add_fused_lm_head", None)
    try:
        source = inspect.getsource(head) if head is not None else ""
    except (OSError, TypeError):
        source = ""
    if original is None or "compact = _use_triton(" not in source:
        if enabled and log:
            log("compat: the installed TRL has no switchable fused LM head; positions scored as TRL decides")
        yield False
        return

    def use_compact(device: Any) -> bool:
        return bool(original(device)) or getattr(device, "type", None) == "cpu"

    utils._use_triton = use_compact
    try:
        yield True
    finally:
        utils._use_triton = original
