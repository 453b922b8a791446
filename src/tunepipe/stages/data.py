"""Stage `data`: load, detect, convert, validate and tokenize; write the prepared splits and statistics.

Gate: the training splits load and hold at least one row.
"""

from __future__ import annotations

from ..data.prepare import prepare, write_prepared
from ..modeling import load_tokenizer
from . import Gate, StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    tok = load_tokenizer(ctx.cfg, log=ctx.log)
    prep = prepare(ctx.cfg, tok, smoke=ctx.smoke, log=ctx.log)
    stats = write_prepared(prep, ctx.stage_dir("data"))
    if prep.cache_hits:
        ctx.log(f"  {prep.cache_hits} of {len(prep.sources)} sources unchanged: taken from the cache")
    ctx.log(f"  {'split':10s} {'format':20s} {'rows in':>8s} {'accepted':>8s} {'rejected':>8s}  file")
    for s in stats["sources"]:
        ctx.log(
            f"  {s['stage'] + '/' + s['split']:10s} {s['format']:20s} {s['rows_in']:8d} "
            f"{s['rows_accepted']:8d} {s['rows_rejected']:8d}  {s['file']}"
        )
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
