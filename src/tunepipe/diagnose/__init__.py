"""`tunepipe diagnose`: read a pasted error log and say where it failed, why, and how to fix it.

This package owns two things:

* the log reader: ANSI colours, per-rank prefixes (`[rank0]:`, `[default0]:`, `0: `, `rank1:`),
  interleaved ranks, chained exceptions, tracebacks whose head was cut off, tunepipe's own
  `error:` / `unexpected error:` lines and torchrun's `ChildFailedError` summary;
* the matcher, which compares every exception found against the known issues in
  `knowledge.yaml` and picks the most specific one; tunepipe's own errors that no entry knows are
  reported as the message they carry (it says what to do) with the meaning of their exit code.

The knowledge is data: a new known issue is a new YAML entry plus a fixture under
tests/fixtures/diagnose/, never a new branch in this file. The CLI wiring lives in cli.py.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import string
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Diagnosis",
    "Frame",
    "KnowledgeEntry",
    "diagnose_text",
    "diagnosis_json",
    "format_diagnosis",
    "load_knowledge",
    "parse_log",
]


@dataclass
class Frame:
    file: str
    line: int
    function: str
    code: str | None = None

    @property
    def is_library(self) -> bool:
        return _is_library_path(self.file)

    def describe(self) -> str:
        return f"{_short_path(self.file)}:{self.line} in {self.function}"


@dataclass
class Diagnosis:
    id: str | None  # None = no known issue matched
    title: str
    where: dict[str, str | None]  # frame (user/project code), raised_in (library), exception
    cause: str
    fix: list[str]
    confidence: float  # 0..1
    rank: int | None = None


@dataclass
class ExceptionRecord:
    """One exception as printed in the log, with the frames of its own traceback."""

    type: str
    message: str
    frames: list[Frame] = field(default_factory=list)
    rank: int | None = None
    order: int = 0  # index of its line in the cleaned log: earlier = happened first
    kind: str | None = None  # the prefix of a tunepipe CLI line (`error`, `gate failed`, ...), else None

    def headline(self, limit: int = 300) -> str:
        first = self.message.strip().splitlines()[0] if self.message.strip() else ""
        text = f"{self.type}: {first}" if first else self.type
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def context(self) -> str:
        """What the patterns see: the exception line, its message and its frames."""
        lines = [f"{self.type}: {self.message}"]
        for f in self.frames:
            lines.append(f'File "{f.file}", line {f.line}, in {f.function}')
            if f.code:
                lines.append(f"    {f.code}")
        return "\n".join(lines)


@dataclass
class Chain:
    """Exceptions linked by "The above exception was ..." markers, root (earliest) first."""

    exceptions: list[ExceptionRecord]


@dataclass
class ParsedLog:
    text: str  # cleaned: no ANSI codes, no rank prefixes
    chains: list[Chain]
    root_rank: int | None  # the failing rank named by torchrun's ChildFailedError summary


# --------------------------------------------------------------------------- knowledge base


@dataclass
class KnowledgeEntry:
    id: str
    title: str
    any: list[re.Pattern[str]]
    all: list[re.Pattern[str]]
    none: list[re.Pattern[str]]
    cause: str
    fix: list[str]
    confidence: float = 0.9
    priority: int = 0  # breaks ties: specific entries above generic ones (e.g. NCCL timeouts, a symptom)
    capture: list[re.Pattern[str]] = field(default_factory=list)  # only fill ${name}s, never decide

    def captured(self, *texts: str) -> dict[str, str]:
        """The named groups of the `capture:` patterns, from the first text where each matches."""
        groups: dict[str, str] = {}
        for p in self.capture:
            for text in texts:
                m = p.search(text)
                if m:
                    groups.update({k: v for k, v in m.groupdict().items() if v and k not in groups})
                    break
        return groups

    def match(self, text: str) -> dict[str, str] | None:
        """The named groups of the patterns that matched (empty dict), or None when it does not match."""
        groups: dict[str, str] = {}
        if self.none and any(p.search(text) for p in self.none):
            return None
        for p in self.all:
            m = p.search(text)
            if not m:
                return None
            groups.update({k: v for k, v in m.groupdict().items() if v})
        if self.any:
            for p in self.any:
                m = p.search(text)
                if m:
                    groups.update({k: v for k, v in m.groupdict().items() if v})
                    break
            else:
                return None
        return groups

    @property
    def specificity(self) -> int:
        return len(self.all) + (1 if self.any else 0)


_ID = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


def _compile(entry_id: str, patterns: Iterable[str]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p, re.IGNORECASE | re.MULTILINE))
        except re.error as e:
            raise ValueError(f"knowledge entry {entry_id!r}: bad pattern {p!r}: {e}") from None
    return out


def _entry(raw: dict[str, Any]) -> KnowledgeEntry:
    eid = str(raw.get("id", ""))
    if not _ID.match(eid):
        raise ValueError(f"knowledge entry id {eid!r} must be kebab-case (a-z, 0-9, dashes)")
    unknown = set(raw) - {"id", "title", "patterns", "cause", "fix", "confidence", "priority"}
    if unknown:
        raise ValueError(f"knowledge entry {eid!r}: unknown keys {sorted(unknown)}")
    pats = raw.get("patterns")
    # A plain list means "any of these"; a mapping can combine any / all / none (and capture, which
    # only fills placeholders from the log when it matches).
    spec: dict[str, list[str]] = {"any": pats} if isinstance(pats, list) else dict(pats or {})
    if set(spec) - {"any", "all", "none", "capture"}:
        raise ValueError(
            f"knowledge entry {eid!r}: patterns takes any, all, none and capture: {sorted(spec)}"
        )
    if not spec.get("any") and not spec.get("all"):
        raise ValueError(f"knowledge entry {eid!r}: patterns needs an `any:` or `all:` list")
    fix = raw.get("fix") or []
    if not raw.get("title") or not raw.get("cause") or not fix or not isinstance(fix, list):
        raise ValueError(f"knowledge entry {eid!r}: title, cause and a list of fix steps are required")
    return KnowledgeEntry(
        id=eid,
        title=str(raw["title"]).strip(),
        any=_compile(eid, spec.get("any") or []),
        all=_compile(eid, spec.get("all") or []),
        none=_compile(eid, spec.get("none") or []),
        cause=" ".join(str(raw["cause"]).split()),
        fix=[" ".join(str(s).split()) for s in fix],
        confidence=float(raw.get("confidence", 0.9)),
        priority=int(raw.get("priority", 0)),
        capture=_compile(eid, spec.get("capture") or []),
    )


def load_knowledge(path: str | Path | None = None) -> list[KnowledgeEntry]:
    """The knowledge base: the shipped knowledge.yaml, or another file with the same layout."""
    if path is None:
        return list(_shipped_knowledge())
    return _parse_knowledge(Path(path).read_text(encoding="utf-8"))


@functools.cache
def _shipped_knowledge() -> tuple[KnowledgeEntry, ...]:
    text = importlib.resources.files(__name__).joinpath("knowledge.yaml").read_text(encoding="utf-8")
    return tuple(_parse_knowledge(text))


def _parse_knowledge(text: str) -> list[KnowledgeEntry]:
    raw = yaml.safe_load(text) or {}
    items = raw.get("entries") if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise ValueError("knowledge base: expected a list of entries (or a mapping with `entries:`)")
    entries = [_entry(item) for item in items]
    seen: set[str] = set()
    for e in entries:
        if e.id in seen:
            raise ValueError(f"knowledge base: duplicate id {e.id!r}")
        seen.add(e.id)
    return entries


# --------------------------------------------------------------------------- log cleaning

# CSI and OSC escapes, plus colour codes whose ESC byte was lost when the log was pasted.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]"
    r"|(?<![\w\]])\[\d{1,3}(?:;\d{1,3})*m"
)
# Timestamps some launchers and CI systems put in front of every line.
_STAMP = re.compile(
    r"^\s*(?:【[^】]*】|\[?\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?\]?)\s?"
)
# torchrun `--tee`/`--local-ranks-filter` prints `[rank0]: ` or `[default0]:`, srun -l prints `0: `.
_RANK = re.compile(
    r"^(?:\[\d+\]\s+)?(?:\[(?:rank|default)(\d+)\]:?|rank(\d+):|(\d{1,3}): |\[rank[a-z]\]:)\s?", re.IGNORECASE
)
# A tqdm bar that the next line was printed after, with no newline (`75%|███  | 6/8 [00:00]gate failed: ...`).
_PROGRESS = re.compile(r"^[^|\n]{0,80}?\d{1,3}%\|[^|]*\|[^\[\n]*\[[^\]\n]*\]\s*(?=\S)")
# A new record in a log (`21:13:42 [sft] running`, `[sft] step 5/8`): it ends the message before it.
_LOG_RECORD = re.compile(r"^(?:\d\d:\d\d:\d\d\s|\[[a-z]+\]\s)")
# glog warnings/infos from c10d and torchrun (`[W1206 18:44:12.7 ...]`, `W0000 00:00:...`): never errors.
_NOISE = re.compile(r"^\s*(?:\[[WI]\d{4} \d\d:\d\d|\[[WI] |[WI]\d{4} \d\d:\d\d:\d\d)")

_TB_HEADER = re.compile(r"Traceback \(most recent call last\)")
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<func>.+?))?\s*$')
_FRAME_IPY = re.compile(r"^\s*File (?P<file>\S+?):(?P<line>\d+),? in (?P<func>.+?)\s*$")
_FRAME_CELL = re.compile(r"^\s*(?P<file>Cell In\s*\[\d*\]), line (?P<line>\d+)\s*$")
_FRAME_RICH = re.compile(r"^\s*│\s*(?P<file>\S+\.py):(?P<line>\d+) in (?P<func>\S+)\s*│?\s*$")
_CHAIN = re.compile(
    r"^\s*(?:The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)\s*$"
)
# Inside a traceback the first unindented line is the exception: `pkg.Type: message` or `Type`.
_EXC = re.compile(r"^(?P<type>(?:[A-Za-z_]\w*\.)*[A-Z_]\w*)(?::(?:\s+(?P<msg>.*)|\s*$)|\s*$)")
# Outside a traceback (head cut off), only names that look like exceptions count.
_EXC_LOOSE = re.compile(
    r"^(?P<type>(?:[A-Za-z_]\w*\.)*[A-Z_]\w*(?:Error|Exception|Exit|Interrupt|Fault|Warning))"
    r":(?:\s+(?P<msg>.*)|\s*$)"
)
# tunepipe's own exceptions need no Error suffix to count (GateFailed, StageStopped, OutOfMemory).
_EXC_OWN = re.compile(r"^(?P<type>(?:tunepipe\.(?:\w+\.)*)?[A-Z]\w*):(?:\s+(?P<msg>.*)|\s*$)")
# tunepipe's own messages (cli.py): exit 2, 3, 75 and the one-line summary of an unexpected error.
_TUNEPIPE = re.compile(r"^(?P<kind>error|gate failed|stopped|unexpected error): (?P<msg>.+)$")
_TUNEPIPE_AT = re.compile(r"^\s+at (?P<file>.+?):(?P<line>\d+) in (?P<func>\S+)\s*$")
_TUNEPIPE_HINT = re.compile(r"^\s+the full traceback is in ")
_TUNEPIPE_TYPES = {
    "error": "tunepipe.Error",
    "gate failed": "tunepipe.GateFailed",
    "stopped": "tunepipe.StageStopped",
}
_ROOT_CAUSE = re.compile(
    r"Root Cause \(first observed failure\):\s*\n\s*\[\d+\]:\s*\n(?:[^\n]*\n){0,6}?\s*rank\s*:\s*(\d+)"
)


def _clean(text: str) -> list[tuple[int | None, str]]:
    """(rank, line) pairs: colours, timestamps and rank prefixes removed."""
    out: list[tuple[int | None, str]] = []
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = _ANSI.sub("", raw)
        line = _STAMP.sub("", line, count=1)
        rank: int | None = None
        # Prefixes nest (`[default0]:[rank0]: ...` from torchrun --tee); the outermost names the process.
        for _ in range(3):
            m = _RANK.match(line)
            if not m:
                break
            digits = next((g for g in m.groups() if g is not None), None)
            if rank is None and digits is not None:  # `[rankx]:` is a placeholder someone typed
                rank = int(digits)
            line = _STAMP.sub("", line[m.end() :], count=1)
        # Pasted into GitHub/Slack, lines often keep a stray backtick from inline code.
        line = line.strip("`") if line.startswith("`") else line
        line = _PROGRESS.sub("", line, count=1)
        out.append((rank, line.rstrip()))
    return out


def parse_log(text: str) -> ParsedLog:
    """Split a log into exception chains, one stream per rank so interleaved tracebacks stay whole."""
    lines = _clean(text)
    streams: dict[int | None, list[tuple[int, str]]] = {}
    for i, (rank, line) in enumerate(lines):
        streams.setdefault(rank, []).append((i, line))
    chains: list[Chain] = []
    for rank, stream in streams.items():
        chains.extend(_parse_stream(stream, rank))
    chains.sort(key=lambda c: c.exceptions[-1].order)
    cleaned = "\n".join(line for _, line in lines)
    m = _ROOT_CAUSE.search(cleaned)
    return ParsedLog(text=cleaned, chains=chains, root_rank=int(m.group(1)) if m else None)


def _frame_from(line: str) -> Frame | None:
    for rx in (_FRAME, _FRAME_IPY, _FRAME_RICH):
        m = rx.match(line)
        if m:
            return Frame(m["file"], int(m["line"]), (m["func"] or "<module>").strip(), None)
    m = _FRAME_CELL.match(line)
    if m:
        return Frame(m["file"], int(m["line"]), "<cell>", None)
    return None


def _is_code_or_caret(line: str) -> bool:
    s = line.strip()
    return bool(s) and (line.startswith((" ", "\t")) or set(s) <= set("^~ "))


def _parse_stream(stream: Sequence[tuple[int, str]], rank: int | None) -> list[Chain]:
    """A small state machine over one rank's lines; tolerant of noise lines inside a traceback."""
    chains: list[Chain] = []
    current: list[ExceptionRecord] = []  # the chain being built
    frames: list[Frame] = []
    in_tb = False  # inside a traceback, before its exception line
    exc: ExceptionRecord | None = None  # the exception whose message may continue
    chained = False  # a chain marker was seen: the next exception joins `current`

    def close_chain() -> None:
        nonlocal current
        if current:
            chains.append(Chain(current))
        current = []

    def add(e: ExceptionRecord) -> None:
        nonlocal chained, exc
        if not chained:
            close_chain()
        current.append(e)
        chained = False
        exc = e

    i = 0
    while i < len(stream):
        order, line = stream[i]
        i += 1
        if _NOISE.match(line):
            continue
        if _CHAIN.match(line):
            chained, exc, in_tb = True, None, False
            continue
        if _TB_HEADER.search(line):
            # IPython prints `TypeError    Traceback (most recent call last)`; Python prints the header alone.
            exc, in_tb, frames = None, True, []
            continue
        frame = _frame_from(line)
        if frame is not None:
            if not in_tb:  # the head of the traceback was cut off
                exc, in_tb, frames = None, True, []
                if current and not chained:
                    close_chain()
            if i < len(stream) and _is_code_or_caret(stream[i][1]) and not _frame_from(stream[i][1]):
                frame.code = stream[i][1].strip()
                i += 1
            frames.append(frame)
            continue
        if in_tb:
            if not line.strip() or line.startswith((" ", "\t")) or set(line.strip()) <= set("^~"):
                continue  # code context, carets, IPython's `--> 16` lines, blank lines
            m = _EXC.match(line) or _EXC_LOOSE.match(line)
            if m:
                add(ExceptionRecord(m["type"], m["msg"] or "", frames, rank, order))
                in_tb, frames = False, []
                continue
            continue  # noise between frames (a warning another thread printed)
        m = _TUNEPIPE.match(line)
        if m:
            kind = m["kind"]
            typ, msg = _TUNEPIPE_TYPES.get(kind, "tunepipe.Error"), m["msg"]
            if kind == "unexpected error":
                inner = _EXC.match(msg)
                typ, msg = (inner["type"], inner["msg"] or "") if inner else ("Exception", msg)
            # Its wrapped lines continue the message below; `  at FILE:LINE in FUNC` gives its frame.
            add(ExceptionRecord(typ, msg, [], rank, order, kind))
            continue
        m = _EXC_LOOSE.match(line) or _EXC_OWN.match(line)
        if m and (m.re is _EXC_LOOSE or _is_own_type(m["type"])):
            add(ExceptionRecord(m["type"], m["msg"] or "", [], rank, order))
            continue
        if exc is not None:
            at = _TUNEPIPE_AT.match(line) if exc.kind else None
            if at:
                exc.frames.append(Frame(at["file"], int(at["line"]), at["func"], None))
                exc = None
            elif exc.kind and _TUNEPIPE_HINT.match(line):
                exc = None
            elif not line.strip():
                # A blank line ends the message, unless it stops on a colon (torch's weights_only
                # message: "WeightsUnpickler error: ", a blank line, then "Unsupported operand 94").
                if not exc.message.rstrip().endswith(":"):
                    exc = None
            elif len(exc.message) > 4000 or _LOG_RECORD.match(line):
                exc = None
            else:
                # Multi-line messages (the torch.load weights_only one, DeepSpeed's config tables,
                # tunepipe's lines wrapped by the terminal).
                exc.message = f"{exc.message}\n{line.strip()}" if exc.message else line.strip()
    if in_tb and frames:  # a traceback whose exception line was cut off
        add(ExceptionRecord("<no exception line>", "", frames, rank, stream[-1][0]))
    close_chain()
    return chains


# --------------------------------------------------------------------------- matching


@dataclass
class _Match:
    entry: KnowledgeEntry
    groups: dict[str, str]
    exc: ExceptionRecord | None
    chain: Chain | None
    position: int  # 0 = root of its chain
    on_exception: bool


def _is_library_path(path: str) -> bool:
    """site-packages, dist-packages and the stdlib are libraries; tunepipe's own code never is."""
    p = path.replace("\\", "/")
    if re.search(r"(?:^|/)tunepipe/", p):
        return False  # the project's own code counts as "your code" even when pip-installed
    if p.startswith(("<ipython", "Cell In")):
        return False
    if "site-packages/" in p or "dist-packages/" in p or p.startswith("<"):
        return True  # <frozen importlib._bootstrap>, <string> (pip's setup.py shim)
    # The interpreter's stdlib: /usr/lib/python3.11/json/decoder.py, C:/Python311/Lib/json/...
    return bool(re.search(r"/lib/python\d\.\d+/|/Lib/", p))


def _short_path(path: str) -> str:
    p = path.replace("\\", "/")
    m = re.search(r"(?:site|dist)-packages/(.+)$", p) or re.search(r"/lib/python\d\.\d+/(.+)$", p)
    return m.group(1) if m else path


def _where(exc: ExceptionRecord | None, chain: Chain | None) -> dict[str, str | None]:
    if exc is None:
        return {"frame": None, "raised_in": None, "exception": None}
    # The exception's own frames first; a chain's other tracebacks fill in when it has none.
    pools = [exc.frames] + ([e.frames for e in reversed(chain.exceptions) if e is not exc] if chain else [])
    user = next((f for frames in pools for f in reversed(frames) if not f.is_library), None)
    lib_frames = next((frames for frames in pools if frames), [])
    raised = lib_frames[-1] if lib_frames and lib_frames[-1].is_library else None
    return {
        "frame": user.describe() if user else None,
        "raised_in": raised.describe() if raised else None,
        "exception": exc.headline() if exc.type != "<no exception line>" else None,
    }


# Lines worth matching in the whole-log fallback; a 2 MB training log is mostly progress and loss lines,
# and running every pattern over all of it would take seconds.
_SIGNAL = re.compile(
    r"error|exception|fail|fatal|abort|assert|killed|signal|exitcode|exit code|timeout|timed out|watchdog"
    r"|nccl|nan\b|inf\b|memory|space|denied|unauthori|gated|offline|connect|not (?:installed|found|set"
    r"|supported)|cannot|can't|could not|couldn't|unable|undefined|requires?|install|deprecated"
    r"|toggled|flash|cuda|bf16|checkpoint|trust_remote_code|rejected|data format|stopped|gate",
)  # matched against the lower-cased text: one C-level scan instead of a regex per line
_FALLBACK_LIMIT = 200_000  # characters, taken from the end: the failure is printed last


def _signal_text(text: str) -> str:
    lower = text.lower()  # same length as text for the ASCII logs this is about; checked below
    if len(lower) != len(text):  # case folding changed offsets (rare non-ASCII): match the tail as it is
        return text[-_FALLBACK_LIMIT:]
    keep: list[str] = []
    last_start = -1
    for m in _SIGNAL.finditer(lower):
        start = text.rfind("\n", 0, m.start()) + 1
        if start == last_start:
            continue
        end = text.find("\n", m.end())
        keep.append(text[start : end if end >= 0 else len(text)])
        last_start = start
    return "\n".join(keep)[-_FALLBACK_LIMIT:]


def _primary(parsed: ParsedLog) -> tuple[ExceptionRecord | None, Chain | None]:
    """The exception to report when nothing matched: the failing rank's, else the last one printed."""
    chains = [c for c in parsed.chains if not c.exceptions[-1].type.endswith("ChildFailedError")]
    chains = chains or parsed.chains
    if parsed.root_rank is not None:
        chains = [c for c in chains if c.exceptions[-1].rank == parsed.root_rank] or chains
    if not chains:
        return None, None
    chain = chains[-1]
    return chain.exceptions[-1], chain


_PLACEHOLDER = re.compile(r"\$\{\w+\}")


def _render(template: str, groups: dict[str, str]) -> str:
    return string.Template(template).safe_substitute(groups)


def _render_steps(steps: Iterable[str], groups: dict[str, str]) -> list[str]:
    """Fix steps; a step whose placeholder the log did not fill (an optional group) is left out."""
    out = [_render(s, groups) for s in steps]
    return [s for s in out if not _PLACEHOLDER.search(s)]


def diagnose_text(text: str, knowledge: Sequence[KnowledgeEntry] | None = None) -> Diagnosis:
    """Diagnose a pasted log: where it failed, the known issue behind it and the fix."""
    kb = list(knowledge) if knowledge is not None else list(_shipped_knowledge())
    parsed = parse_log(text)
    matches: list[_Match] = []
    for chain in parsed.chains:
        for pos, exc in enumerate(chain.exceptions):
            ctx = exc.context()
            for entry in kb:
                groups = entry.match(ctx)
                if groups is not None:
                    matches.append(_Match(entry, groups, exc, chain, pos, True))
    primary, primary_chain = _primary(parsed)
    if not matches:
        own = _own_error(primary, primary_chain)
        if own is not None:
            return own
    if not matches:
        # No exception line names a known issue: look at the whole log (glog NCCL lines, exit -9, pip output).
        signal = _signal_text(parsed.text)
        for entry in kb:
            groups = entry.match(signal)
            if groups is not None:
                matches.append(_Match(entry, groups, primary, primary_chain, 0, False))
    if not matches:
        where = _where(primary, primary_chain)
        return Diagnosis(
            id=None,
            title="unknown error",
            where=where,
            cause=(
                "No known issue matches this log."
                + (
                    f" The error is {where['exception']}."
                    if where["exception"]
                    else " No exception was found in it."
                )
            ),
            fix=[
                "Read the exception above and the frame in your code it points at.",
                "Check the environment and the config with `tunepipe doctor tunepipe.yaml`.",
                "If the log was cut, paste all of it (from the first `Traceback` line) and diagnose again.",
                "Search the exception message in the issue trackers of the library named in `raised in`.",
            ],
            confidence=0.0,
            rank=primary.rank if primary else None,
        )

    def key(m: _Match) -> tuple[int, int, int, int, int, int]:
        on_root_rank = int(
            parsed.root_rank is not None and m.exc is not None and m.exc.rank == parsed.root_rank
        )
        order = m.exc.order if m.exc else 0
        return (int(m.on_exception), on_root_rank, m.entry.priority, -m.position, m.entry.specificity, order)

    best = max(matches, key=key)
    exc, chain = best.exc, best.chain
    # A whole-log match is weaker evidence, more so when the log has an exception nothing matched.
    unmatched_exception = primary is not None and primary.type != "<no exception line>"
    confidence = best.entry.confidence * (1.0 if best.on_exception else (0.6 if unmatched_exception else 0.8))
    groups = {**best.entry.captured(exc.context() if exc else "", _signal_text(parsed.text)), **best.groups}
    fix = _render_steps(best.entry.fix, groups)
    if exc is not None and _is_own(exc):
        # tunepipe's own message says what to do in this case: that first, the entry's general steps after.
        fix = [step for step in _instructions(exc.message) if step not in fix] + fix
    return Diagnosis(
        id=best.entry.id,
        title=_render(best.entry.title, groups),
        where=_where(exc, chain),
        cause=_render(best.entry.cause, groups),
        fix=fix,
        confidence=round(min(max(confidence, 0.0), 1.0), 2),
        rank=exc.rank if exc else None,
    )


# --------------------------------------------------------------------------- tunepipe's own errors

# Exit codes (cli.py): a CLI line's prefix says which; in a log's traceback the exception class does.
_KIND_EXIT = {"error": 2, "gate failed": 3, "stopped": 75, "unexpected error": 1}
_CLASS_EXIT = {
    "ConfigError": 2,
    "DataError": 2,
    "TemplateError": 2,
    "EmbeddedModelMissing": 2,
    "GateFailed": 3,
    "StageStopped": 75,
}
_EXIT = {
    1: (
        "unexpected error",
        "Exit code 1 means an error tunepipe did not expect: the full traceback is in "
        "`<output_dir>/logs/<stage>.log`, and `tunepipe diagnose <output_dir>/logs/<stage>.log` reads it.",
    ),
    2: (
        "bad config or data",
        "Exit code 2 means bad config or data: fix what the message names and run the same command "
        "again (`tunepipe doctor tunepipe.yaml` checks the config without running anything).",
    ),
    3: (
        "a stage gate failed",
        "Exit code 3 means a stage gate failed: the stage ran, but its result did not pass the check "
        "the message names; fix that, then run `tunepipe run tunepipe.yaml` again.",
    ),
    75: (
        "stopped with a checkpoint saved",
        "Exit code 75 means tunepipe stopped early with a complete checkpoint (time budget or a "
        "signal): nothing is broken; run the same command again to resume.",
    ),
}
_CLASS_DEF = re.compile(r"^class (?P<name>\w+)\((?P<bases>[^)]*)\)", re.MULTILINE)
_EXC_BASE = re.compile(r"(?:Error|Exception|Exit|Interrupt)$")


@functools.cache
def _own_exception_names() -> frozenset[str]:
    """The exception classes tunepipe defines (ConfigError, GateFailed, OutOfMemory, ...), read from its
    source, not imported (diagnose must not load torch): the CLI prints them without their module."""
    bases: dict[str, list[str]] = {}
    for f in Path(__file__).resolve().parent.parent.rglob("*.py"):
        for m in _CLASS_DEF.finditer(f.read_text(encoding="utf-8", errors="replace")):
            bases[m["name"]] = [b.strip().rsplit(".", 1)[-1] for b in m["bases"].split(",")]
    own: set[str] = set()
    while True:  # subclasses of tunepipe's own exceptions count too
        more = {
            n for n, bs in bases.items() if n not in own and any(b in own or _EXC_BASE.search(b) for b in bs)
        }
        if not more:
            return frozenset(own)
        own |= more


def _is_own(e: ExceptionRecord) -> bool:
    if e.kind == "error":
        # Other tools print `error:` lines too; pip's carry a code (`metadata-generation-failed`).
        return not re.fullmatch(r"[\w-]+", e.message.strip())
    return e.kind in ("gate failed", "stopped") or _is_own_type(e.type)


def _is_own_type(name: str) -> bool:
    return name.startswith("tunepipe.") or ("." not in name and name in _own_exception_names())


# An instruction in a message: a clause that starts with what to do (`run ...`, `set ...`, `On CPU use ...`).
_DO = re.compile(
    r"(?:(?:or|then|and|else|otherwise|instead)\s+)?(?:(?:on|for|with|in|under)\s+[\w.-]+\s+)?"
    r"(?:run|rerun|set|use|fix|map|raise|lower|try|check|delete|remove|install|pass|choose|pick|add|rename"
    r"|point|see|read|convert|save|write|create|give|reduce|increase|unset|export|move|call|start|resume"
    r"|make|put|keep|drop|shorten|split|replace|upgrade|free|wait|look|enable|disable|switch|turn|options:)"
    r"(?=[\s`:])",
    re.IGNORECASE,
)
_CLAUSE_START = re.compile(r":\s+|;\s+|,\s+|\(\s*|\s(?=or\s|then\s)")


def _instructions(message: str) -> list[str]:
    """The parts of a tunepipe message that say what to do: its messages name the fix after the problem."""
    # A line that starts with a capital begins a sentence (rows-rejected's closing "Fix the rows ...");
    # other line breaks are the terminal's wrapping, or a list that belongs to the line before.
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n(?=[A-Z`])", message)]
    out: list[str] = []
    m = re.search(r"did you mean [^?]+\?", " ".join(paragraphs), re.IGNORECASE)
    if m:
        out.append(m.group(0)[0].upper() + m.group(0)[1:])
    sentences = [
        x for p in paragraphs for x in re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=[A-Z`(])|;\s+", p)
    ]
    for sentence in sentences:
        starts = [0] + [c.end() for c in _CLAUSE_START.finditer(sentence)]
        start = next((i for i in starts if _DO.match(sentence, i)), None)
        if start is None:
            continue
        step = sentence[start:].strip(" ,;")
        if sentence[:start].rstrip().endswith("("):  # inside parentheses: up to the closing one
            step = step.split(")", 1)[0]
        while step.endswith(")") and step.count(")") > step.count("("):
            step = step[:-1]
        if step and step not in out:
            out.append(step[0].upper() + step[1:])
    return out[:4]


def _own_error(exc: ExceptionRecord | None, chain: Chain | None) -> Diagnosis | None:
    """tunepipe's own error, which no knowledge entry matched: its message is the cause and holds the fix."""
    candidates = list(reversed(chain.exceptions)) if chain else ([exc] if exc else [])
    own = next((e for e in candidates if _is_own(e)), None)
    if own is None:
        return None
    cls = own.type.rsplit(".", 1)[-1]
    code = _KIND_EXIT.get(own.kind or "", _CLASS_EXIT.get(cls, 1))
    label, meaning = _EXIT[code]
    message = " ".join(own.message.split())
    steps = _instructions(own.message) or ["Do what the message names: the file, key or value to change."]
    return Diagnosis(
        id="tunepipe-message",
        title=f"tunepipe's own error: {label} (exit {code})",
        where=_where(own, chain),
        cause=message or own.type,
        fix=[*steps, meaning],
        confidence=0.9,
        rank=own.rank,
    )


# --------------------------------------------------------------------------- output


def format_diagnosis(d: Diagnosis) -> str:
    """Plain text in three parts: Where, Cause, Fix."""
    head = f"{d.id}: {d.title}" if d.id else "unknown error (no known issue matches)"
    out = [f"diagnosis: {head}  (confidence {d.confidence:.2f})", "", "Where"]
    rows = [
        ("exception", d.where.get("exception")),
        ("your code", d.where.get("frame")),
        ("raised in", d.where.get("raised_in")),
        ("rank", str(d.rank) if d.rank is not None else None),
    ]
    shown = [(k, v) for k, v in rows if v]
    out += [f"  {k + ':':<11}{v}" for k, v in shown] or ["  (no traceback found in the log)"]
    out += ["", "Cause", textwrap.fill(d.cause, 100, initial_indent="  ", subsequent_indent="  "), "", "Fix"]
    for n, step in enumerate(d.fix, 1):
        out.append(textwrap.fill(step, 100, initial_indent=f"  {n}. ", subsequent_indent="     "))
    return "\n".join(out)


def diagnosis_json(d: Diagnosis) -> dict[str, Any]:
    """The `--json` shape: id, title, where (with the rank), cause, fix, confidence."""
    return {
        "id": d.id,
        "title": d.title,
        "where": {**d.where, "rank": d.rank},
        "cause": d.cause,
        "fix": list(d.fix),
        "confidence": d.confidence,
    }
