"""The run folder's integrity: one writer at a time (a lock a killed run cannot leave stuck), and files
that are either whole or absent (atomic writes that clean up after themselves)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .redaction import redact_text

LOCK_NAME = ".tunepipe.lock"
# The command line of this process when it is the `tunepipe` command (set by cli.main): pipeline.json
# records it with its working folder, so that `tunepipe ui` can resume a run with the same command.
INVOCATION: list[str] | None = None
# A write that failed for lack of room or rights: the user's to fix (exit 2), not a crash.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS


class RunFolderBusy(Exception):
    """Another tunepipe process writes this run folder (exit code 2)."""


@contextlib.contextmanager
def atomic_writer(path: Path, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """Open `path` for writing so that readers see the old file or the new one, never a part: a
    uniquely named temp file in the same folder, fsynced, renamed over `path` when the block ends.
    On any error (a full disk, a read-only folder) the temp file is removed, `path` is untouched,
    and the error names `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and not e.filename:
            e.filename = str(path)  # a failed write() names no file: say which one it was
        raise


def write_atomic(path: Path, text: str, encoding: str = "utf-8") -> None:
    """`text` to `path`, whole or not at all (see atomic_writer)."""
    with atomic_writer(path, encoding) as fh:
        fh.write(text)


def _holder(fh: IO[str]) -> dict[str, Any]:
    fh.seek(0)
    try:
        info = json.loads(fh.read() or "{}")
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str | None = None) -> Iterator[None]:
    """Hold the run folder's lock while the block runs. The lock is an flock on `.tunepipe.lock`:
    the kernel drops it when the process ends, however it ends (kill -9 included), so it never
    needs cleaning up. The file records the holder's PID, command and start time for the message
    the next process gets."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fh = path.open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fh)
            pid = info.get("pid", "?")
            raise RunFolderBusy(
                f"{run_dir} is in use by another tunepipe process (PID {pid}"
                + (f" on {info['host']}" if info.get("host") else "")
                + (f", `{info['command']}`" if info.get("command") else "")
                + (f", since {info['started_at']}" if info.get("started_at") else "")
                + "). Two runs writing one folder would mix their checkpoints and logs. Wait for it to "
                f"finish, stop it (kill -TERM {pid} saves a checkpoint, exit 75), or set another "
                "project.output_dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": redact_text(command or " ".join(["tunepipe", *sys.argv[1:]])),
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
        )
        fh.flush()
        yield
    finally:
        fh.close()  # closing the file releases the lock
