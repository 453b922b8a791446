"""Importing the user's own code named in a config (scorers, rewards, stage plugins): the config's
folder is searched first, so a `scorers.py` next to tunepipe.yaml works without installing anything."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def import_user_module(name: str, base_dir: Path, what: str) -> ModuleType:
    """Module `name`, with `base_dir` first on sys.path while importing. ValueError naming `what`
    (e.g. "metric 'scorers:f'") when it cannot be imported."""
    added = str(base_dir) not in sys.path
    if added:
        sys.path.insert(0, str(base_dir))
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(
            f"{what}: cannot import module {name!r} ({e}); put {name}.py next to the config"
        ) from None
    finally:
        if added:
            sys.path.remove(str(base_dir))


def user_function(spec: str, base_dir: Path, what: str) -> Any:
    """`module:function` -> the function (ValueError naming `what` when there is none)."""
    module_name, func_name = spec.split(":", 1)
    fn = getattr(import_user_module(module_name, base_dir, f"{what} {spec!r}"), func_name, None)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {module_name} has no function {func_name!r}")
    return fn
