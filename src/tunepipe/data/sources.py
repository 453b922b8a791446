"""Reading source files into (line, record) pairs; unreadable rows come back as errors, never dropped."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, unsupported type)."""


@dataclass
class Row:
    file: str
    line: int  # 1-based line for JSONL, 1-based record index for JSON arrays
    record: dict[str, Any] | None
    error: str | None = None


SUPPORTED = (".jsonl", ".json")


def expand(path: Path) -> list[Path]:
    """A file, a folder of supported files, or a glob -> the files, sorted."""
    if any(ch in str(path) for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUPPORTED)
    elif path.is_file():
        files = [path]
    else:
        raise SourceError(f"data source not found: {path} (paths are relative to the config file)")
    files = [f for f in files if f.is_file()]
    if not files:
        raise SourceError(f"no {' or '.join(SUPPORTED)} files found under {path}")
    for f in files:
        if f.suffix not in SUPPORTED:
            raise SourceError(f"{f}: unsupported file type {f.suffix!r} (supported: {', '.join(SUPPORTED)})")
    return files


def read_rows(path: Path) -> Iterator[Row]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue  # blank lines are not rows
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Row(str(path), n, None, f"invalid JSON: {e.msg} at column {e.colno}")
                    continue
                if not isinstance(rec, dict):
                    yield Row(str(path), n, None, f"expected a JSON object, got {type(rec).__name__}")
                    continue
                yield Row(str(path), n, rec)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise SourceError(f"{path}: a JSON object must hold exactly one list of records")
            data = lists[0]
        if not isinstance(data, list):
            raise SourceError(f"{path}: expected a JSON array of records")
        for n, rec in enumerate(data, 1):
            if isinstance(rec, dict):
                yield Row(str(path), n, rec)
            else:
                yield Row(str(path), n, None, f"expected a JSON object, got {type(rec).__name__}")
