"""Load every configured source, convert, validate, tokenize and write the prepared splits.

Nothing is dropped silently: each rejected row goes to rejects.jsonl with its file, line and reason,
for every source rows_in = rows_accepted + rows_rejected, and files of a source folder that are not
read are listed in stats.json. When the data cannot be used, DataError carries what was read so far,
so rejects.jsonl and stats.json are written for the failed run too.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, DataSource
from ..runfolder import atomic_writer, write_atomic
from .chat import IGNORE_INDEX, TemplateError, tokenize_conversations
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
from .sources import Input, Row, SourceError, csv_delimiter, read_rows, scan

SMOKE_ROWS = {"train": 16, "eval": 8}
DETECT_ROWS = 50  # records looked at to tell a source's format
# Rows of a prompt and an `answer` column (GRPO data), told apart before the conversation formats.
PROMPT_ANSWER = "prompt_answer"
SHOWN_REJECTS = 5  # rejects quoted in an error message; all are in rejects.jsonl


class DataError(Exception):
    """Data that cannot be used as configured (exit code 2). `partial` is what was read before the
    failure (sources, rejects, skipped files), for the data stage to write."""

    def __init__(self, message: str, partial: Prepared | None = None) -> None:
        super().__init__(message)
        self.partial = partial


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
    cache_hits: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)  # files of source folders not read


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
        "histogram": _histogram(s),
    }


def _histogram(sorted_lengths: list[int], bins: int = 20) -> dict[str, list[int]]:
    """Token-length histogram for the report: `bins` equal-width bins from min to max."""
    lo, hi = sorted_lengths[0], sorted_lengths[-1]
    width = max(1, -(-(hi - lo + 1) // bins))
    edges = [lo + i * width for i in range(bins + 1)]
    counts = [0] * bins
    for n in sorted_lengths:
        counts[min((n - lo) // width, bins - 1)] += 1
    return {"edges": edges, "counts": counts}


def cache_dir() -> Path:
    """Prepared sources, keyed by content: unchanged inputs are not converted or tokenized again."""
    from ..quickstart.model import tunepipe_home

    return tunepipe_home() / "cache" / "data"


_CODE: str | None = None


def _data_code_version() -> str:
    """A hash of the data package's source: a fix to conversion or masking invalidates the cache."""
    global _CODE
    if _CODE is None:
        h = hashlib.sha256()
        for f in sorted(Path(__file__).parent.glob("*.py")):
            h.update(f.read_bytes())
        _CODE = h.hexdigest()[:16]
    return _CODE


def tokenizer_fingerprint(tok: Any) -> str:
    """Vocabulary, special tokens, chat template and class: what changes the token ids or masks."""
    h = hashlib.sha256()
    h.update(type(tok).__name__.encode())
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tok, "chat_template", "")).encode())
    h.update(str(getattr(tok, "add_bos_token", "")).encode())
    return h.hexdigest()[:16]


class _Preparer:
    def __init__(self, cfg: Config, tokenizer: Any, smoke: bool):
        self.cache_hits = 0
        self.tok_fp = tokenizer_fingerprint(tokenizer)
        self.cfg = cfg
        self.tok = tokenizer
        self.smoke = smoke
        self.rejects: list[dict[str, Any]] = []
        self.sources: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []

    def partial(self) -> Prepared:
        return Prepared({}, self.sources, self.rejects, self.cache_hits, self.skipped)

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

    def _internal(self, stage: str, rec: dict[str, Any], fmt: str, src: DataSource) -> tuple[str, Any]:
        """Phase 1: a record -> ("conv", messages) | ("text", str) | ("pair", pair) | ("prompt", row)
        | ("unpaired", [rows]), as the stage's data kind (stages.registry) asks. RowError if bad."""
        from ..stages import registry

        spec = registry.get(stage)
        if spec.data == "pairs":
            if fmt not in PREFERENCE_FORMATS:
                raise RowError(
                    f"a {fmt} row in {spec.title} data: preference data needs prompt/chosen/rejected "
                    f"(list conversations under {_stage_for('conversations')} instead)"
                )
            return "pair", to_preference(rec, fmt, src.columns)
        if spec.data == "unpaired":
            from .formats import to_unpaired

            return "unpaired", to_unpaired(rec, fmt, src.columns)
        if spec.data == "prompts":
            return "prompt", _to_prompt(rec, fmt, src.columns, spec.title)
        if fmt in PREFERENCE_FORMATS:
            raise RowError(
                f"a preference pair in {spec.title} data; list it under {_stage_for('pairs')} instead"
            )
        if fmt == "unpaired":
            raise RowError(
                f"an unpaired feedback row (with a label) in {spec.title} data; "
                f"list it under {_stage_for('unpaired')} instead"
            )
        if fmt == "text":
            return "text", to_text(rec, src.columns)
        return "conv", to_conversation(rec, fmt, src.columns)

    def _tokenize(self, items: list[tuple[str, Any]]) -> list[list[tuple[list[int], list[int]]] | Exception]:
        """Phase 2, batched: the token sequences of every item (two for a pair), or the error."""
        d = self.cfg.data
        convs: list[Any] = []
        modes: list[str] = []
        owner: list[int] = []
        texts: list[tuple[int, str]] = []
        for k, (kind, obj) in enumerate(items):
            if kind in ("prompt", "unpaired"):
                continue  # not tokenized here: the trainer templates them (see _finish)
            if kind == "conv":
                convs.append(obj), modes.append(d.train_on), owner.append(k)
            elif kind == "pair":
                for side in ("chosen", "rejected"):
                    convs.append(obj["prompt"] + obj[side]), modes.append("last"), owner.append(k)
            else:
                texts.append((k, obj))
        out: list[Any] = [[] for _ in items]
        seqs = tokenize_conversations(self.tok, convs, modes, self.cfg.model.enable_thinking)
        for k, seq in zip(owner, seqs, strict=True):
            if isinstance(out[k], list):
                out[k] = seq if isinstance(seq, Exception) else [*out[k], seq]
        eos = self.tok.eos_token_id
        for b in range(0, len(texts), 512):
            chunk = texts[b : b + 512]
            enc = self.tok([t for _, t in chunk], add_special_tokens=True)
            for (k, _), ids in zip(chunk, enc["input_ids"], strict=True):
                ids = list(ids)
                if eos is not None and (not ids or ids[-1] != eos):
                    ids.append(eos)  # language modelling: documents end, every token trained
                out[k] = [(ids, list(ids))]
        return out

    def _prompt_tokens(self, prompt: list[dict[str, Any]]) -> int:
        """The templated prompt's length in tokens, as the trainer will see it (generation prompt on)."""
        thinking = self.cfg.model.enable_thinking
        kw = {} if thinking is None else {"enable_thinking": thinking}
        try:
            ids = self.tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, **kw)
        except Exception as e:  # a template that rejects these messages (roles, order)
            raise RowError(f"the chat template cannot render this prompt: {e}") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)

    def _finish_untokenized(self, kind: str, obj: Any) -> tuple[Any, int, bool]:
        """Prompts (GRPO) and unpaired completions (KTO): the trainer templates them; here the prompt's
        length is checked against data.max_length under the truncation policy (no cut: a cut prompt
        loses its question, so truncate drops such a row too)."""
        rows = obj if kind == "unpaired" else [obj]
        n = 0
        for r in rows:
            msgs = r["prompt"] + (r["completion"] if kind == "unpaired" else [])
            k = self._prompt_tokens(msgs) if kind == "prompt" else self._prompt_tokens(r["prompt"])
            if kind == "unpaired":
                texts = [str(m.get("content", "")) for m in r["completion"]]
                k += sum(len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"])
            n = max(n, k)
        limit = self.cfg.data.max_length
        if n > limit:
            msg = f"too long: {n} tokens > data.max_length {limit}"
            if self.cfg.data.truncation == "error":
                raise DataError(f"{msg} (data.truncation: error). Raise max_length or use truncation: drop")
            raise RowError(msg + " (a prompt is not cut: the row is dropped)")
        return obj, n, False

    def _finish(self, kind: str, obj: Any, seqs: list[tuple[list[int], list[int]]]) -> tuple[dict, int, bool]:
        """Phase 3: masks checked, truncation policy applied, the prepared record."""
        if kind in ("prompt", "unpaired"):
            return self._finish_untokenized(kind, obj)
        fitted = []
        for ids, labels in seqs:
            if kind == "conv" and all(x == IGNORE_INDEX for x in labels):
                raise RowError("no trained token: the assistant turns are empty after templating")
            fitted.append(self._fit(ids, labels))
        cut = any(c for _, _, c in fitted)
        n = max(len(ids) for ids, _, _ in fitted)
        if kind == "pair":
            return obj, n, cut
        ids, labels, _ = fitted[0]
        rec = {"input_ids": ids, "labels": labels}
        if kind == "conv":
            rec["messages"] = obj
        return rec, n, cut

    def _source_format(self, stage: str, rows: list[Row], src: DataSource, where: str) -> str:
        if src.format and src.format != "auto":
            return src.format
        sample = [r.record for r in rows[:DETECT_ROWS] if r.record is not None]
        if not sample:
            return "unknown"
        from ..stages import registry

        answer = src.columns.get("answer", "answer")
        if registry.get(stage).data == "prompts" and all(answer in r for r in sample):
            return PROMPT_ANSWER
        try:
            return detect_format(sample, src.columns, where)
        except FormatError as e:
            raise DataError(str(e)) from None

    def _cache_key(self, stage: str, inp: Input, src: DataSource) -> str:
        d, m = self.cfg.data, self.cfg.model
        parts = {
            "code": _data_code_version(),
            "input": inp.fingerprint(),
            "stage": stage,
            "format": src.format,
            "columns": src.columns,
            "tokenizer": self.tok_fp,
            "max_length": d.max_length,
            "truncation": d.truncation,
            "train_on": d.train_on,
            "enable_thinking": m.enable_thinking,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def _process(self, stage: str, inp: Input, src: DataSource, where: str) -> dict[str, Any]:
        """One input, converted and tokenized: the accepted records and the rejects, cached by content."""
        cache = cache_dir() / f"{self._cache_key(stage, inp, src)}.json" if inp.kind != "hub" else None
        if cache is not None and cache.is_file():
            try:
                self.cache_hits += 1
                return json.loads(cache.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                self.cache_hits -= 1  # unreadable cache entry: rebuild it
        path = Path(inp.name)
        delimiter = csv_delimiter(path) if inp.kind == "file" and path.suffix in (".csv", ".tsv") else None
        rows = list(read_rows(inp))
        try:
            fmt = self._source_format(stage, rows, src, f"{inp} ({where})")
        except DataError as e:
            if delimiter is None or not rows or rows[0].record is None or len(rows[0].record) > 1:
                raise
            raise DataError(
                f"{e}\n  The file was read as CSV with the delimiter {delimiter!r} and its header is one "
                f"column; if it uses another delimiter (one of , ; tab |), it was not recognised: save "
                "the file comma-separated, or tab-separated as .tsv"
            ) from None
        # Rejects are cached without the file name: the same content may be read under another path.
        rejects: list[dict[str, Any]] = []
        formats: set[str] = set()
        items: list[tuple[Row, tuple[str, Any]]] = []

        def reject(row: Row, e: Exception) -> None:
            rejects.append({"line": row.line, "reason": str(e)})

        for row in rows:
            try:
                if row.error:
                    raise RowError(row.error)
                assert row.record is not None
                row_fmt = fmt
                if fmt != PROMPT_ANSWER and (not src.format or src.format == "auto"):
                    fits = candidates(row.record, src.columns)
                    row_fmt = fits[0] if len(fits) == 1 else fmt
                items.append((row, self._internal(stage, row.record, row_fmt, src)))
                formats.add(row_fmt)
            except RowError as e:
                reject(row, e)
        if not getattr(self.tok, "chat_template", None) and any(kind != "text" for _, (kind, _) in items):
            raise DataError(
                f"{inp}: the tokenizer of {self.cfg.model.name_or_path} has no chat template, which "
                "conversations need; set model.chat_template to a .jinja file, the template text, or chatml"
            )
        taken = []
        for (row, (kind, obj)), seqs in zip(items, self._tokenize([it for _, it in items]), strict=True):
            try:
                if isinstance(seqs, Exception):
                    raise seqs
                taken.append(list(self._finish(kind, obj, seqs)))
            except (RowError, TemplateError) as e:
                reject(row, e)
            except DataError as e:  # truncation: error stops at the first long row, with its place
                raise DataError(f"{inp}:{row.line}: {e}") from None
        rejects.sort(key=lambda r: r["line"])
        result = {
            "format": ",".join(sorted(formats)) or fmt,
            "rows_in": len(rows),
            "taken": taken,
            "rejects": rejects,
        }
        if delimiter is not None:
            result["delimiter"] = delimiter
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
            tmp.replace(cache)
        return result

    def _unreadable(self, stage: str, split: str, file: str, src: DataSource, e: Exception) -> DataError:
        """A source that stops the stage, recorded in the stats with the reason."""
        self.sources.append(
            {
                "stage": stage,
                "split": split,
                "file": file,
                "format": "error",
                "rows_in": 0,
                "rows_accepted": 0,
                "rows_rejected": 0,
                "weight": src.weight,
                "error": str(e),
            }
        )
        return DataError(str(e))

    def load(self, stage: str, split: str, sources: list[DataSource]) -> SplitResult:
        out = SplitResult()
        for i, src in enumerate(sources):
            where = f"data.{stage}.{split}[{i}] ({src.path})"
            try:
                found = scan(self.cfg.path(src.path), src.path, src.split)
            except SourceError as e:
                raise self._unreadable(stage, split, src.path, src, e) from None
            self.skipped += [
                {"file": s.file, "reason": s.reason, "stage": stage, "split": split} for s in found.skipped
            ]
            rows_in = 0
            for inp in found.inputs:
                try:
                    res = self._process(stage, inp, src, where)
                except (SourceError, DataError) as e:
                    raise self._unreadable(stage, split, str(inp), src, e) from None
                rows_in += res["rows_in"]
                self.rejects.extend(
                    {"file": str(inp), **r, "stage": stage, "split": split} for r in res["rejects"]
                )
                taken = [tuple(t) for t in res["taken"]]
                entry = {
                    "stage": stage,
                    "split": split,
                    "file": str(inp),
                    "format": res["format"],
                    "rows_in": res["rows_in"],
                    "rows_accepted": len(taken),
                    "rows_rejected": res["rows_in"] - len(taken),
                    "weight": src.weight,
                }
                if "delimiter" in res:
                    entry["delimiter"] = res["delimiter"]
                self.sources.append(entry)
                for rec, n, cut in self._weighted(taken, src.weight):
                    for one in rec if isinstance(rec, list) else [rec]:  # a pair split for KTO: two rows
                        out.rows.append(one)
                        out.lengths.append(n)
                        out.truncated += int(cut)
            if rows_in == 0:
                files = [str(inp) for inp in found.inputs]
                what = (
                    f"{files[0]} is empty" if len(files) == 1 else f"every file is empty ({', '.join(files)})"
                )
                raise DataError(
                    f"{where}: {what}: no rows (blank lines and a CSV header are not rows); add records, "
                    f"or remove the source from data.{stage}.{split}"
                )
        return out

    def _weighted(self, items: list, weight: float) -> list:
        """weight < 1 takes a seeded sample, > 1 repeats rows; 1 keeps them as they are."""
        if weight == 1 or not items:
            return items
        n = max(1, round(len(items) * weight))
        rng = random.Random(self.cfg.data.seed)
        whole, rest = divmod(n, len(items))
        return items * whole + rng.sample(items, rest)

    def check_train_rows(self, stage: str, train: SplitResult) -> None:
        """A training split without rows: say why, with the first rejects."""
        if train.rows:
            return
        ours = [s for s in self.sources if s["stage"] == stage and s["split"] == "train"]
        rows_in, accepted = sum(s["rows_in"] for s in ours), sum(s["rows_accepted"] for s in ours)
        rejects = [r for r in self.rejects if r["stage"] == stage and r["split"] == "train"]
        why = f"{len(rejects)} of {rows_in} rows rejected" if rejects else f"{rows_in} rows read"
        if accepted:
            why += f", and data.{stage}.eval_split took the {accepted} accepted for eval"
        msg = f"data.{stage}.train: no usable rows ({why})"
        if rejects:
            msg += f":\n{_quote(rejects)}\nFix the rows (all are listed in data/rejects.jsonl)."
        raise DataError(msg)

    def check_bad_rows(self) -> None:
        total = sum(s["rows_in"] for s in self.sources)
        bad = len(self.rejects)
        limit = self.cfg.data.max_bad_rows
        allowed = limit * total if limit < 1 else limit
        if bad > allowed:
            first = _quote(self.rejects)
            raise DataError(
                f"{bad} of {total} rows rejected, more than data.max_bad_rows={limit:g} allows.\n{first}\n"
                "Fix the rows (all are listed in data/rejects.jsonl) or raise data.max_bad_rows."
            )


def _quote(rejects: list[dict[str, Any]]) -> str:
    """The first rejects as `  file:line: reason` lines, for an error message."""
    lines = [f"  {r['file']}:{r['line']}: {r['reason']}" for r in rejects[:SHOWN_REJECTS]]
    if len(rejects) > SHOWN_REJECTS:
        lines.append(f"  ... {len(rejects) - SHOWN_REJECTS} more")
    return "\n".join(lines)


def prepare(cfg: Config, tokenizer: Any, smoke: bool = False, log: Callable[[str], None] = print) -> Prepared:
    """Every configured source, prepared. DataError when the data cannot be used: its `partial` holds
    the sources, rejects and skipped files read so far."""
    p = _Preparer(cfg, tokenizer, smoke)
    try:
        splits = _load_splits(p, cfg)
        p.check_bad_rows()
    except DataError as e:
        e.partial = p.partial()
        raise
    for name, sp in splits.items():
        if smoke:
            keep = SMOKE_ROWS["train" if name.endswith("train") else "eval"]
            sp.rows, sp.lengths = sp.rows[:keep], sp.lengths[:keep]
    return Prepared(splits, p.sources, p.rejects, p.cache_hits, p.skipped)


def _stage_for(kind: str) -> str:
    """Where rows of a data kind belong: 'data.dpo' (or the stages that read it)."""
    from ..stages import registry

    names = [n for n, s in registry.training_stages().items() if s.data == kind]
    return " or ".join(f"data.{n}" for n in names) or "another stage's data"


def _prompt_messages(msgs: list[Any], field: str) -> list[dict[str, Any]]:
    """A prompt given as messages (no assistant reply needed: the answer is its own column)."""
    out = []
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise RowError(f"{field}[{i}]: expected {{role, content}} with text content, got {m!r}"[:200])
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise RowError(f"{field}[{i}]: unknown role {m['role']!r} (system, user, assistant, tool)")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _to_prompt(rec: dict[str, Any], fmt: str, columns: dict[str, str], title: str) -> dict[str, Any]:
    """A prompt and its reference answer (GRPO): an `answer` column, else the last assistant turn of
    any conversation format (what comes before it is the prompt)."""
    answer_col = columns.get("answer", "answer")
    if answer_col in rec and fmt not in PREFERENCE_FORMATS:
        answer = rec[answer_col]
        if not isinstance(answer, str | int | float) or isinstance(answer, bool) or str(answer).strip() == "":
            raise RowError(f"`{answer_col}` must be a non-empty text or number (got {answer!r})")
        rest = {k: v for k, v in rec.items() if k != answer_col}
        prompt_col = columns.get("prompt", "prompt")
        if prompt_col in rest and isinstance(rest[prompt_col], str):
            prompt = [{"role": "user", "content": rest[prompt_col]}]
        elif prompt_col in rest and isinstance(rest[prompt_col], list):
            prompt = _prompt_messages(rest[prompt_col], prompt_col)
        elif fmt == PROMPT_ANSWER:
            raise RowError(
                f"no `{prompt_col}` next to `{answer_col}`: a prompt row needs the question as `prompt` "
                "(text or messages); map another name with columns: {prompt: your_column}"
            )
        else:
            prompt = [m for m in to_conversation(rest, fmt, columns) if m["role"] != "assistant"]
        text = str(answer)
    else:
        if fmt in PREFERENCE_FORMATS or fmt in ("text", "unpaired"):
            raise RowError(
                f"a {fmt} row in {title} data: prompts need a reference answer (an `answer` column, or a "
                "conversation whose last assistant turn is the answer)"
            )
        msgs = to_conversation(rec, fmt, columns)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        if last < 1:
            raise RowError(
                "no assistant turn after a prompt (the last assistant turn is the reference answer)"
            )
        prompt, text = msgs[:last], str(msgs[last]["content"])
    if not prompt or prompt[-1]["role"] == "assistant":
        raise RowError("the prompt must end with a user turn")
    return {"prompt": prompt, "answer": text, "messages": [*prompt, {"role": "assistant", "content": text}]}


def _load_splits(p: _Preparer, cfg: Config) -> dict[str, SplitResult]:
    from ..stages import registry

    splits: dict[str, SplitResult] = {}
    for stage in registry.trained(cfg):
        scfg = getattr(cfg.data, stage)
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
        p.check_train_rows(stage, train)
        splits[f"{stage}_train"], splits[f"{stage}_eval"] = train, ev
    return splits


def clear_prepared(out_dir: Path) -> None:
    """The previous run's outputs of the data stage, removed before it runs: a failed run must not
    leave old splits and stats to be read as current. Only the files this stage writes."""
    from ..stages import registry

    splits = [n for s in registry.training_stages().values() for n in (s.train_split, s.eval_split)]
    for name in (*(f"{s}.jsonl" for s in splits), "stats.json", "rejects.jsonl"):
        (out_dir / name).unlink(missing_ok=True)


def write_prepared(prep: Prepared, out_dir: Path, error: str | None = None) -> dict[str, Any]:
    """The splits, rejects.jsonl and stats.json. With `error` (a failed stage: `prep` is the partial
    result, without splits), stats.json records it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Each file whole or not at all: a full disk leaves the previous file (or none), never a part.
    for name, sp in prep.splits.items():
        with atomic_writer(out_dir / f"{name}.jsonl") as fh:
            for r in sp.rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    with atomic_writer(out_dir / "rejects.jsonl") as fh:
        for r in prep.rejects:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    stats = {
        "sources": prep.sources,
        "splits": {name: _length_stats(sp.lengths, sp.truncated) for name, sp in prep.splits.items()},
        "rejected": len(prep.rejects),
        "skipped_files": prep.skipped,
    }
    if error is not None:
        stats["error"] = error
    write_atomic(out_dir / "stats.json", json.dumps(stats, indent=2))
    return stats


def read_split(data_dir: Path, name: str) -> list[dict[str, Any]]:
    path = data_dir / f"{name}.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
