"""Which process this is under `accelerate launch` / torchrun. Only the main process writes the
run folder's shared files (state, logs, adapters); every process trains."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0
