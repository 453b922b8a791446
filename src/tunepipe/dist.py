"""Which process this is under `accelerate launch` / torchrun, and the few collectives tunepipe's own
code needs (the trainers bring their own). Only the main process writes the run folder's shared
files (state, logs, adapters, eval metrics); every process trains and evaluates its share."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

# Object collectives wait as long as the slowest process needs: the others wait while the main
# process runs lm-eval alone, which can take hours. A process that dies does not leave the rest
# hanging that long: torchrun / tunepipe's launcher stop the whole group when one process fails.
OBJECT_TIMEOUT = timedelta(hours=24)

_object_group: Any = None


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def ensure_process_group() -> bool:
    """Under a launcher (WORLD_SIZE > 1), join the process group unless something (accelerate, a
    trainer) already did: nccl with this process on its LOCAL_RANK GPU, gloo on CPU. Returns whether
    there are several processes. The rendezvous comes from the launcher's MASTER_ADDR/MASTER_PORT."""
    if world_size() <= 1:
        return False
    import torch
    import torch.distributed as td

    if not td.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())  # before nccl: one GPU per process, not all on cuda:0
            td.init_process_group("nccl")
        else:
            td.init_process_group("gloo")
    return True


def _objects() -> Any:
    """A gloo group for Python objects: no GPU memory for pickles under nccl, and a long timeout."""
    global _object_group
    import torch.distributed as td

    if _object_group is None:
        _object_group = td.new_group(backend="gloo", timeout=OBJECT_TIMEOUT)
    return _object_group


def all_gather_objects(obj: T) -> list[T]:
    """`obj` of every process, in rank order, on every process; [obj] in a single process."""
    if world_size() <= 1:
        return [obj]
    import torch.distributed as td

    ensure_process_group()
    out: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(out, obj, group=_objects())
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` in the main process only while the others wait, and return its result in every
    process. Its exception is raised in every process, so the whole group stops with the same error
    instead of the others waiting for a result that never comes."""
    if world_size() <= 1:
        return fn()
    import torch.distributed as td

    ensure_process_group()
    box: list[Any] = [None]
    if is_main():
        try:
            value = fn()
        except Exception as e:
            box[0] = (False, e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))
            td.broadcast_object_list(box, src=0, group=_objects())
            raise
        box[0] = (True, value)
    td.broadcast_object_list(box, src=0, group=_objects())
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _picklable(obj: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True
