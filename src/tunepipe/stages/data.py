"""Stage `data`: load, detect, convert, validate and tokenize; write the prepared splits and statistics.

Gate: the training splits load and hold at least one row. A failed stage still writes rejects.jsonl
and stats.json (with the error), and never leaves the previous run's splits behind.
"""

from __future__ import annotations

from ..data.prepare import DataError, Prepared, clear_prepared, prepare, write_prepared
from ..data.sources import SUPPORTED
from ..modeling import load_tokenizer
from . import Gate, StageContext, StageResult


def _log_sources(ctx: StageContext, prep: Prepared) -> None:
    ctx.log(f"  {'split':10s} {'format':20s} {'rows in':>8s} {'accepted':>8s} {'rejected':>8s}  file")
    for s in prep.sources:
        ctx.log(
            f"  {s['stage'] + '/' + s['split']:10s} {s['format']:20s} {s['rows_in']:8d} "
            f"{s['rows_accepted']:8d} {s['rows_rejected']:8d}  {s['file']}"
        )
        usual = "\t" if s["file"].endswith(".tsv") else ","
        if s.get("delimiter", usual) != usual:
            ctx.log(f"  {'':10s} {'':20s} read with the delimiter {s['delimiter']!r}, not {usual!r}")
    for k in prep.skipped:
        ctx.log(f"  skipped {k['file']}: {k['reason']} (read: {', '.join(SUPPORTED)})")


def run(ctx: StageContext) -> StageResult:
    out = ctx.stage_dir("data")
    clear_prepared(out)
    try:
        tok = load_tokenizer(ctx.cfg, log=ctx.log)
        prep = prepare(ctx.cfg, tok, smoke=ctx.smoke, log=ctx.log)
    except Exception as e:
        partial = e.partial if isinstance(e, DataError) else None
        partial = partial or Prepared({}, [], [])
        write_prepared(partial, out, error=str(e))
        _log_sources(ctx, partial)
        ctx.log(f"  wrote {out / 'rejects.jsonl'} ({len(partial.rejects)} rejected rows) and stats.json")
        raise
    stats = write_prepared(prep, out)
    if prep.cache_hits:
        ctx.log(f"  {prep.cache_hits} of {len(prep.sources)} sources unchanged: taken from the cache")
    _log_sources(ctx, prep)
    for r in prep.rejects[:5]:
        ctx.log(f"  rejected {r['file']}:{r['line']}: {r['reason']}")
    if len(prep.rejects) > 5:
        ctx.log(f"  ... {len(prep.rejects) - 5} more in data/rejects.jsonl")
    sizes = {name: sp["rows"] for name, sp in stats["splits"].items()}
    gates = [
        Gate(
            "data_loads",
            all(n > 0 for k, n in sizes.items() if k.endswith("_train")),
            ", ".join(f"{k}={n}" for k, n in sizes.items()),
        )
    ]
    return StageResult(
        summary=", ".join(f"{k} {n} rows" for k, n in sizes.items()) + f"; {len(prep.rejects)} rejected",
        gates=gates,
        outputs={"splits": sizes, "rejected": len(prep.rejects)},
    )
