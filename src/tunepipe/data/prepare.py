"""Load every configured source, convert, validate, tokenize and write the prepared splits.

Nothing is dropped silently: each rejected row goes to rejects.jsonl with its file, line and reason,
and for every source rows_in = rows_accepted + rows_rejected.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, DataSource
from .chat import IGNORE_INDEX, TemplateError, tokenize_conversation
from .formats import (
    PREFERENCE_FORMATS,
    FormatError,
    RowError,
    candidates,
    detect_format,
    to_conversation,
    to_preference,
    to_text,
)
from .sources import Input, Row, SourceError, expand, read_rows

SMOKE_ROWS = {"train": 16, "eval": 8}
DETECT_ROWS = 50  # records looked at to tell a source's format


class DataError(Exception):
    """Data that cannot be used as configured (exit code 2)."""


@dataclass
class SplitResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0


@dataclass
class Prepared:
    splits: dict[str, SplitResult]
    sources: list[dict[str, Any]]
    rejects: list[dict[str, Any]]


def _length_stats(lengths: list[int], truncated: int) -> dict[str, Any]:
    if not lengths:
        return {"rows": 0}
    s = sorted(lengths)
    return {
        "rows": len(s),
        "tokens": sum(s),
        "min": s[0],
        "mean": round(statistics.fmean(s), 1),
        "p50": s[len(s) // 2],
        "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
        "max": s[-1],
        "truncated": truncated,
    }


class _Preparer:
    def __init__(self, cfg: Config, tokenizer: Any, smoke: bool):
        self.cfg = cfg
        self.tok = tokenizer
        self.smoke = smoke
        self.rejects: list[dict[str, Any]] = []
        self.sources: list[dict[str, Any]] = []

    def _fit(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int], bool]:
        """Apply the truncation policy; raises RowError for rows that must be rejected."""
        limit, policy = self.cfg.data.max_length, self.cfg.data.truncation
        if len(ids) <= limit:
            return ids, labels, False
        if policy == "truncate":
            ids, labels = ids[:limit], labels[:limit]
            if all(x == IGNORE_INDEX for x in labels):
                raise RowError(f"every trained token was cut by truncation to max_length {limit}")
            return ids, labels, True
        msg = f"too long: {len(ids)} tokens > data.max_length {limit}"
        if policy == "error":
            raise DataError(
                f"{msg} (data.truncation: error). Raise max_length or use truncation: drop|truncate"
            )
        raise RowError(msg + " (data.truncation: drop)")

    def _tokenize_text(self, text: str) -> tuple[list[int], list[int]]:
        """Language modelling: every token trained, EOS appended so documents end."""
        ids = list(self.tok(text, add_special_tokens=True)["input_ids"])
        eos = self.tok.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids, list(ids)

    def _convert(
        self, stage: str, rec: dict[str, Any], fmt: str, src: DataSource
    ) -> tuple[dict[str, Any], int, bool]:
        d = self.cfg.data
        think = self.cfg.model.enable_thinking
        if stage == "dpo":
            if fmt not in PREFERENCE_FORMATS:
                raise RowError(
                    f"a {fmt} row in DPO data: preference data needs prompt/chosen/rejected "
                    "(list conversations under data.sft instead)"
                )
            pair = to_preference(rec, fmt, src.columns)
            lengths, cut = [], False
            for side in ("chosen", "rejected"):
                ids, labels = tokenize_conversation(
                    self.tok, pair["prompt"] + pair[side], train_on="last", enable_thinking=think
                )
                ids, labels, c = self._fit(ids, labels)
                lengths.append(len(ids))
                cut |= c
            return pair, max(lengths), cut
        if fmt in PREFERENCE_FORMATS:
            raise RowError("a preference pair in SFT data; list it under data.dpo instead")
        if fmt == "text":
            ids, labels = self._tokenize_text(to_text(rec, src.columns))
            ids, labels, cut = self._fit(ids, labels)
            return {"input_ids": ids, "labels": labels}, len(ids), cut
        conv = to_conversation(rec, fmt, src.columns)
        ids, labels = tokenize_conversation(self.tok, conv, train_on=d.train_on, enable_thinking=think)
        if all(x == IGNORE_INDEX for x in labels):
            raise RowError("no trained token: the assistant turns are empty after templating")
        ids, labels, cut = self._fit(ids, labels)
        return {"input_ids": ids, "labels": labels, "messages": conv}, len(ids), cut

    def _source_format(self, inp: Input, rows: list[Row], src: DataSource, where: str) -> str:
        if src.format and src.format != "auto":
            return src.format
        sample = [r.record for r in rows[:DETECT_ROWS] if r.record is not None]
        if not sample:
            return "unknown"
        try:
            return detect_format(sample, src.columns, where)
        except FormatError as e:
            raise DataError(str(e)) from None

    def load(self, stage: str, split: str, sources: list[DataSource]) -> SplitResult:
        out = SplitResult()
        for i, src in enumerate(sources):
            where = f"data.{stage}.{split}[{i}] ({src.path})"
            for inp in expand(self.cfg.path(src.path), src.path, src.split):
                rows = list(read_rows(inp))
                fmt = self._source_format(inp, rows, src, f"{inp} ({where})")
                taken: list[tuple[dict[str, Any], int, bool]] = []
                formats: set[str] = set()
                for row in rows:
                    try:
                        if row.error:
                            raise RowError(row.error)
                        assert row.record is not None
                        row_fmt = fmt
                        if not src.format or src.format == "auto":
                            fits = candidates(row.record, src.columns)
                            row_fmt = fits[0] if len(fits) == 1 else fmt
                        taken.append(self._convert(stage, row.record, row_fmt, src))
                        formats.add(row_fmt)
                    except (RowError, TemplateError) as e:
                        self.rejects.append(
                            {
                                "file": str(inp),
                                "line": row.line,
                                "reason": str(e),
                                "stage": stage,
                                "split": split,
                            }
                        )
                self.sources.append(
                    {
                        "stage": stage,
                        "split": split,
                        "file": str(inp),
                        "format": ",".join(sorted(formats)) or fmt,
                        "rows_in": len(rows),
                        "rows_accepted": len(taken),
                        "rows_rejected": len(rows) - len(taken),
                        "weight": src.weight,
                    }
                )
                for rec, n, cut in self._weighted(taken, src.weight):
                    out.rows.append(rec)
                    out.lengths.append(n)
                    out.truncated += int(cut)
        return out

    def _weighted(self, items: list, weight: float) -> list:
        """weight < 1 takes a seeded sample, > 1 repeats rows; 1 keeps them as they are."""
        if weight == 1 or not items:
            return items
        n = max(1, round(len(items) * weight))
        rng = random.Random(self.cfg.data.seed)
        whole, rest = divmod(n, len(items))
        return items * whole + rng.sample(items, rest)

    def check_bad_rows(self) -> None:
        total = sum(s["rows_in"] for s in self.sources)
        bad = len(self.rejects)
        limit = self.cfg.data.max_bad_rows
        allowed = limit * total if limit < 1 else limit
        if bad > allowed:
            first = "\n".join(f"  {r['file']}:{r['line']}: {r['reason']}" for r in self.rejects[:5])
            raise DataError(
                f"{bad} of {total} rows rejected, more than data.max_bad_rows={limit:g} allows.\n{first}\n"
                "Fix the rows (all are listed in data/rejects.jsonl) or raise data.max_bad_rows."
            )


def prepare(cfg: Config, tokenizer: Any, smoke: bool = False, log: Callable[[str], None] = print) -> Prepared:
    p = _Preparer(cfg, tokenizer, smoke)
    splits: dict[str, SplitResult] = {}
    try:
        for stage in ("sft", "dpo"):
            scfg = getattr(cfg.data, stage)
            if not getattr(cfg, stage).enabled:
                continue
            if not scfg.train:
                raise DataError(f"{cfg.source}: {stage} is enabled but data.{stage}.train lists no source")
            train = p.load(stage, "train", scfg.train)
            ev = p.load(stage, "eval", scfg.eval) if scfg.eval else SplitResult()
            if scfg.eval_split and train.rows:
                order = list(range(len(train.rows)))
                random.Random(cfg.data.seed).shuffle(order)
                n_eval = max(1, round(len(order) * scfg.eval_split))
                pick = [set(order[:n_eval]), set(order[n_eval:])]
                ev, train = (
                    SplitResult([train.rows[i] for i in sorted(s)], [train.lengths[i] for i in sorted(s)])
                    for s in pick
                )
            splits[f"{stage}_train"], splits[f"{stage}_eval"] = train, ev
    except SourceError as e:
        raise DataError(str(e)) from None
    p.check_bad_rows()
    for name, sp in splits.items():
        if smoke:
            keep = SMOKE_ROWS["train" if name.endswith("train") else "eval"]
            sp.rows, sp.lengths = sp.rows[:keep], sp.lengths[:keep]
        if name.endswith("_train") and not sp.rows:
            raise DataError(f"data.{name.split('_')[0]}.train: no usable rows (see data/rejects.jsonl)")
    return Prepared(splits, p.sources, p.rejects)


def write_prepared(prep: Prepared, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, sp in prep.splits.items():
        tmp = out_dir / f".{name}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as fh:
            for r in sp.rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.replace(out_dir / f"{name}.jsonl")
    with (out_dir / "rejects.jsonl").open("w", encoding="utf-8") as fh:
        for r in prep.rejects:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    stats = {
        "sources": prep.sources,
        "splits": {name: _length_stats(sp.lengths, sp.truncated) for name, sp in prep.splits.items()},
        "rejected": len(prep.rejects),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def read_split(data_dir: Path, name: str) -> list[dict[str, Any]]:
    path = data_dir / f"{name}.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
