"""Reading data sources into numbered records; unreadable rows come back as errors, never dropped.

A source is a local file (.jsonl, .json, .csv, .tsv, .parquet), a glob or folder of such files, a
folder written by `datasets.save_to_disk`, or a Hugging Face hub dataset id. Row numbers are the
1-based line for JSONL/CSV/TSV and the 1-based record index for JSON arrays, parquet and datasets.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SourceError(ValueError):
    """A source that cannot be read at all (missing, unsupported, offline hub id)."""


@dataclass
class Row:
    file: str
    line: int  # 1-based line (JSONL/CSV/TSV) or record index (JSON array, parquet, datasets)
    record: dict[str, Any] | None
    error: str | None = None


SUPPORTED = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Input:
    """One readable input: a file, a `save_to_disk` folder, or a hub dataset id."""

    kind: str  # file | saved | hub
    name: str  # the path, or the hub id
    split: str | None = None

    def __str__(self) -> str:
        return self.name if self.kind != "hub" else f"hub:{self.name}"

    def fingerprint(self) -> str:
        if self.kind == "hub":
            return f"hub:{self.name}:{self.split}"
        path = Path(self.name)
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}".encode())
            if st.st_size <= 64 << 20:
                h.update(f.read_bytes())
            else:  # hashing many GB on every run is too slow: size + mtime
                h.update(str(st.st_mtime_ns).encode())
        return h.hexdigest()


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _SAVED_MARKERS)


def _inside(p: Path, folders: list[Path]) -> bool:
    return any(d in p.parents for d in folders)


def expand(path: Path, raw: str | None = None, split: str | None = None) -> list[Input]:
    """A source path (resolved against the config) -> its inputs, sorted. `raw` is the path as the
    user wrote it, used to recognise hub ids."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
        saved = [f for f in files if is_saved_dataset(f)]
        files = [f for f in files if (f.is_file() and not _inside(f, saved)) or f in saved]
    elif is_saved_dataset(path):
        return [Input("saved", str(path), split)]
    elif path.is_dir():
        # save_to_disk folders inside are datasets, not loose .json files.
        saved = [d for d in path.rglob("*") if is_saved_dataset(d)]
        files = sorted(
            [p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED and not _inside(p, saved)]
            + saved
        )
    elif path.is_file():
        files = [path]
    elif raw and HUB_ID.match(raw) and not raw.startswith((".", "/")) and Path(raw).suffix not in SUPPORTED:
        # `data/train.jsonl` fits the owner/name shape too, but a data-file suffix means a missing file.
        return [Input("hub", raw, split)]
    else:
        raise SourceError(f"data source not found: {path} (paths are relative to the config file)")
    if not files:
        raise SourceError(f"no {', '.join(SUPPORTED)} files found under {path}")
    out = []
    for f in files:
        if is_saved_dataset(f):
            out.append(Input("saved", str(f), split))
        elif f.suffix not in SUPPORTED:
            raise SourceError(f"{f}: unsupported file type {f.suffix!r} (supported: {', '.join(SUPPORTED)})")
        else:
            out.append(Input("file", str(f)))
    return out


def _object_rows(name: str, records: Iterator[Any]) -> Iterator[Row]:
    for n, rec in enumerate(records, 1):
        if isinstance(rec, dict):
            yield Row(name, n, rec)
        else:
            yield Row(
                name, n, None, f"not an object: expected a record with fields, got {type(rec).__name__}"
            )


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue  # blank lines are not rows
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield Row(str(path), n, None, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(rec, dict):
                yield Row(
                    str(path), n, None, f"not an object: expected a JSON object, got {type(rec).__name__}"
                )
                continue
            yield Row(str(path), n, rec)


def _read_json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise SourceError(
            f"{path}:{e.lineno}: invalid JSON: {e.msg} (a .json file must be one JSON array or object; "
            "one record per line is .jsonl)"
        ) from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(lists) != 1:
            raise SourceError(
                f"{path}: a JSON object must hold exactly one list of records, found "
                f"{len(lists)} ({', '.join(lists) or 'none'})"
            )
        data = next(iter(lists.values()))
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON array of records")
    yield from _object_rows(str(path), iter(data))


def _cell(value: str) -> Any:
    """CSV cells holding JSON lists or objects (message lists) are parsed; everything else is text."""
    v = value.strip()
    if v[:1] in "[{" and v[-1:] in "]}":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return value
    return value


def _read_csv(path: Path) -> Iterator[Row]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        width = len(header)
        while True:
            start = reader.line_num + 1  # the line this record starts on
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                yield Row(str(path), start, None, f"unreadable CSV row: {e}")
                continue
            if not cells or all(not c.strip() for c in cells):
                continue  # blank lines are not rows
            if len(cells) != width:
                yield Row(str(path), start, None, f"has {len(cells)} fields, the header has {width}")
                continue
            yield Row(str(path), start, {k: _cell(v) for k, v in zip(header, cells, strict=True)})


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)

    def records() -> Iterator[Any]:
        for batch in pf.iter_batches(batch_size=4096):
            yield from batch.to_pylist()

    yield from _object_rows(str(path), records())


def _pick_split(ds: Any, name: str, split: str | None) -> Any:
    from datasets import DatasetDict

    if not isinstance(ds, DatasetDict):
        return ds
    want = split or "train"
    if want not in ds:
        raise SourceError(f"{name}: no split {want!r} (it has {', '.join(ds)}); set `split:` on the source")
    return ds[want]


def _read_saved(inp: Input) -> Iterator[Row]:
    from datasets import load_from_disk

    ds = _pick_split(load_from_disk(inp.name), inp.name, inp.split)
    yield from _object_rows(inp.name, iter(ds))


def hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _read_hub(inp: Input) -> Iterator[Row]:
    local = f"data/{inp.name.split('/')[-1]}"
    fix = (
        'download it where there is network (python -c "import datasets; '
        f"datasets.load_dataset('{inp.name}').save_to_disk('{local}')\") and set `path: {local}`, "
        "or point `path:` at a local .jsonl/.csv/.parquet file"
    )
    if hub_offline():
        raise SourceError(
            f"'{inp.name}' is not a local file or folder, so it was read as a Hugging Face hub dataset id, "
            f"but this machine is offline (HF_HUB_OFFLINE=1): {fix}"
        )
    from datasets import load_dataset

    try:
        ds = load_dataset(inp.name, split=inp.split or "train")
    except Exception as e:  # network, auth, missing dataset: all need the same advice
        raise SourceError(
            f"'{inp.name}' is not a local file or folder, and loading it as a hub dataset failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {fix}"
        ) from None
    yield from _object_rows(str(inp), iter(ds))


def read_rows(inp: Input | Path) -> Iterator[Row]:
    if isinstance(inp, Path):
        inp = Input("file", str(inp))
    if inp.kind == "hub":
        yield from _read_hub(inp)
        return
    if inp.kind == "saved":
        yield from _read_saved(inp)
        return
    path = Path(inp.name)
    reader = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".tsv": _read_csv,
        ".parquet": _read_parquet,
    }[path.suffix]
    yield from reader(path)
