"""Reading data sources into numbered records; unreadable rows come back as errors, never dropped.

A source is a local file (.jsonl, .json, .csv, .tsv, .parquet), a glob or folder of such files, a
folder written by `datasets.save_to_disk`, or a Hugging Face hub dataset id. Row numbers are the
1-based line for JSONL/CSV/TSV and the 1-based record index for JSON arrays, parquet and datasets.
Text files are UTF-8: a UTF-16/32 file is a SourceError with the `iconv` line that converts it, and
a line holding a byte that is not UTF-8 is that line's error (the rest of the file is read).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import shlex
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
CSV_DELIMITERS = ",;\t|"
# Bytes that are not UTF-8, as `errors="surrogateescape"` decodes them: U+DC80..U+DCFF.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
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


@dataclass(frozen=True)
class Skipped:
    """A file in a source folder that is not read (unsupported type): reported, never dropped silently."""

    file: str
    reason: str


@dataclass
class Scan:
    inputs: list[Input]
    skipped: list[Skipped]


def expand(path: Path, raw: str | None = None, split: str | None = None) -> list[Input]:
    """A source path (resolved against the config) -> its inputs, sorted. `raw` is the path as the
    user wrote it, used to recognise hub ids."""
    return scan(path, raw, split).inputs


def _hidden(p: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(folder).parts)


def scan(path: Path, raw: str | None = None, split: str | None = None) -> Scan:
    """`expand`, plus the files of a source folder that are skipped and why (hidden files such as
    .gitkeep are left out quietly)."""
    skipped: list[Skipped] = []
    text = str(path)
    if any(ch in text for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
        saved = [f for f in files if is_saved_dataset(f)]
        files = [f for f in files if (f.is_file() and not _inside(f, saved)) or f in saved]
    elif is_saved_dataset(path):
        return Scan([Input("saved", str(path), split)], [])
    elif path.is_dir():
        # save_to_disk folders inside are datasets, not loose .json files.
        saved = [d for d in path.rglob("*") if is_saved_dataset(d)]
        files = list(saved)
        for p in sorted(path.rglob("*")):
            if not p.is_file() or _inside(p, saved):
                continue
            if p.suffix in SUPPORTED:
                files.append(p)
            elif not _hidden(p, path):
                skipped.append(Skipped(str(p), f"unsupported type {p.suffix or '(no extension)'}"))
        files.sort()
    elif path.is_file():
        files = [path]
    elif raw and HUB_ID.match(raw) and not raw.startswith((".", "/")) and Path(raw).suffix not in SUPPORTED:
        # `data/train.jsonl` fits the owner/name shape too, but a data-file suffix means a missing file.
        return Scan([Input("hub", raw, split)], [])
    else:
        raise SourceError(f"data source not found: {path} (paths are relative to the config file)")
    if not files:
        found = f" (it holds only {', '.join(Path(s.file).name for s in skipped[:5])})" if skipped else ""
        raise SourceError(f"no {', '.join(SUPPORTED)} files found under {path}{found}")
    out = []
    for f in files:
        if is_saved_dataset(f):
            out.append(Input("saved", str(f), split))
        elif f.suffix not in SUPPORTED:
            raise SourceError(f"{f}: unsupported file type {f.suffix!r} (supported: {', '.join(SUPPORTED)})")
        else:
            out.append(Input("file", str(f)))
    return Scan(out, skipped)


def _object_rows(name: str, records: Iterator[Any]) -> Iterator[Row]:
    for n, rec in enumerate(records, 1):
        if isinstance(rec, dict):
            yield Row(name, n, rec)
        else:
            yield Row(
                name, n, None, f"not an object: expected a record with fields, got {type(rec).__name__}"
            )


def check_text_encoding(path: Path) -> None:
    """A UTF-16 or UTF-32 file (with a byte-order mark, or without one: NUL bytes) cannot be read as
    UTF-8 line by line: one clear error with the command that converts it."""
    with path.open("rb") as fh:
        head = fh.read(4096)
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        enc, how = "UTF-32", "it starts with a UTF-32 byte-order mark"
    elif head.startswith((b"\xff\xfe", b"\xfe\xff")):
        enc, how = "UTF-16", "it starts with a UTF-16 byte-order mark"
    elif b"\x00" in head:
        # UTF-16 text without a byte-order mark: ASCII characters have a NUL in their other byte.
        enc = "UTF-16LE" if head[1::2].count(0) >= head[0::2].count(0) else "UTF-16BE"
        how = "it holds NUL bytes, as UTF-16 text does, or it is not a text file"
    else:
        return
    out = path.with_name(f"{path.stem}.utf8{path.suffix}")
    raise SourceError(
        f"{path}: not UTF-8: the file looks {enc}-encoded ({how}); tunepipe reads UTF-8 text. Convert it: "
        f"iconv -f {enc} -t UTF-8 {shlex.quote(str(path))} > {shlex.quote(str(out))} and point the source "
        "at the new file (or replace the original with it)"
    )


def not_utf8(text: str) -> str | None:
    """The reject reason for a line decoded with errors="surrogateescape" that holds a non-UTF-8 byte."""
    m = _NOT_UTF8.search(text)
    if m is None:
        return None
    return (
        f"not UTF-8: byte 0x{ord(m.group()) - 0xDC00:02x} at column {m.start() + 1}; save the file as UTF-8"
    )


def json_line_error(line: str, e: json.JSONDecodeError) -> str:
    """The reason for an invalid JSONL line, with the 1-based character column in the line as an editor
    shows it (`line` without its line ending, so a missing quote is not reported past the end)."""
    col = e.pos + 1
    if e.pos == 0 and line.startswith("\ufeff"):
        return (
            "invalid JSON: the line starts with a byte-order mark (U+FEFF, left by joining files); remove it"
        )
    before = line[: e.pos].rstrip()
    if before.endswith(",") and line[e.pos : e.pos + 1] in ("}", "]"):
        return f"invalid JSON: trailing comma at column {len(before)}"
    if e.msg.startswith("Unterminated string"):
        return f"invalid JSON: unterminated string starting at column {col} (a missing closing quote?)"
    msg = e.msg.removesuffix(" at")  # "Invalid control character at"
    if e.pos >= len(line):
        return (
            f"invalid JSON: {msg} at the end of the line (column {col}): the record is cut short, or "
            "spread over several lines (JSONL needs one record per line)"
        )
    return f"invalid JSON: {msg} at column {col}"


def _read_jsonl(path: Path) -> Iterator[Row]:
    check_text_encoding(path)
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as fh:
        for n, raw in enumerate(fh, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue  # blank lines are not rows
            bad = not_utf8(line)
            if bad:
                yield Row(str(path), n, None, bad)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield Row(str(path), n, None, json_line_error(line, e))
                continue
            if not isinstance(rec, dict):
                yield Row(
                    str(path), n, None, f"not an object: expected a JSON object, got {type(rec).__name__}"
                )
                continue
            yield Row(str(path), n, rec)


def _read_json(path: Path) -> Iterator[Row]:
    check_text_encoding(path)
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    m = _NOT_UTF8.search(text)
    if m is not None:
        start = text.rfind("\n", 0, m.start()) + 1
        line = text.count("\n", 0, m.start()) + 1
        raise SourceError(
            f"{path}:{line}: {not_utf8(text[start : m.end()])} (a .json file is read whole, so one bad "
            "byte stops the file; .jsonl rejects only the line)"
        )
    try:
        data = json.loads(text)
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


def csv_delimiter(path: Path) -> str:
    """The delimiter of a .csv/.tsv file: the suffix's (comma, tab) unless the header is then a single
    column and another of , ; tab | splits it (csv.Sniffer first, then the header alone)."""
    default = "\t" if path.suffix == ".tsv" else ","
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        sample = fh.read(64 << 10)
    if "\n" in sample.rstrip("\r\n"):
        sample = sample[: sample.rfind("\n") + 1]  # whole lines only

    def width(d: str) -> int:
        return len(next(csv.reader(io.StringIO(sample), delimiter=d), []))

    if width(default) > 1:
        return default
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS).delimiter
        if width(sniffed) > 1:
            return sniffed
    except csv.Error:
        pass  # no consistent delimiter in the sample: the header decides
    best = max(CSV_DELIMITERS, key=width)
    return best if width(best) > 1 else default


def _read_csv(path: Path) -> Iterator[Row]:
    check_text_encoding(path)
    delimiter = csv_delimiter(path)
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        lines: list[str] = []  # the raw lines of the record being read, to place a bad byte

        def feed() -> Iterator[str]:
            for line in fh:
                lines.append(line)
                yield line

        reader = csv.reader(feed(), delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        bad = next(filter(None, map(not_utf8, lines)), None)
        if bad:
            raise SourceError(f"{path}:1: the header line is {bad}")
        width = len(header)
        while True:
            start = reader.line_num + 1  # the line this record starts on
            lines.clear()
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                yield Row(str(path), start, None, f"unreadable CSV row: {e}")
                continue
            bad = next(((k, b) for k, b in enumerate(map(not_utf8, lines)) if b), None)
            if bad:
                k, reason = bad
                at = f"line {start + k}, column" if k else "column"
                yield Row(str(path), start, None, reason.replace("at column", f"at {at}", 1))
                continue
            if not cells or all(not c.strip() for c in cells):
                continue  # blank lines are not rows
            if len(cells) != width:
                yield Row(str(path), start, None, f"has {len(cells)} fields, the header has {width}")
                continue
            yield Row(str(path), start, {k: _cell(v) for k, v in zip(header, cells, strict=True)})


def _not_parquet(path: Path, e: Exception) -> SourceError:
    with path.open("rb") as fh:
        head = fh.read(512).lstrip()
    if head[:1] in (b"{", b"["):
        hint = "it looks like JSON: name it .jsonl (one record per line) or .json"
    elif head and b"\x00" not in head:
        hint = "it looks like text: give it the suffix of its real format (.csv, .tsv, .jsonl)"
    else:
        hint = "write it again with pandas `df.to_parquet(path)` or pyarrow `pq.write_table(table, path)`"
    return SourceError(f"not a parquet file: {path} ({type(e).__name__}: {e}); {hint}")


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise _not_parquet(path, e) from None

    def records() -> Iterator[Any]:
        try:
            for batch in pf.iter_batches(batch_size=4096):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise SourceError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None

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
    if path.stat().st_size == 0:
        return  # no rows; the caller says the file is empty
    reader = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".tsv": _read_csv,
        ".parquet": _read_parquet,
    }[path.suffix]
    yield from reader(path)
