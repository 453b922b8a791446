"""Stage `eval`: every model in `eval.models` (base and each trained stage's) on every set in
`eval.sets`, plus lm-evaluation-harness benchmarks when `eval.lm_eval` is set.

Conversation sets give generation metrics (the reply generated from the prompt scored against the
reference reply) and loss/perplexity on the reference reply; preference sets give
preference_accuracy and reward_margin. Writes `eval/metrics.json` as {model: {set: {metric: value}}}
and `eval/samples/<model>.<set>.jsonl` (prompt, reference, output, score per example).
Gate: metrics written and finite.

Under several processes (torchrun, accelerate launch, `hardware.processes`) every process loads each
model and computes its share of every set's batches; the per-example results are gathered, so every
process computes the same metrics as one process would, and the main process alone writes them.
lm-eval runs in the main process while the others wait.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import dist
from ..config import LIKELIHOOD_METRICS, PREFERENCE_METRICS, Config, EvalSet
from ..data.chat import prompt_text, tokenize_conversation
from ..data.formats import PREFERENCE_FORMATS, FormatError, RowError, detect_format, to_conversation
from ..data.formats import to_preference as to_pair
from ..data.prepare import DataError, read_split
from ..data.sources import SourceError, expand, read_rows
from ..evaluation import (
    ONE_PROCESS,
    Shard,
    assistant_loss,
    generate,
    last_user_text,
    preference_margins,
    reference_reply,
    shard_size,
)
from ..metrics import metric_key, score, scorer_for, strip_thinking
from ..modeling import load_stage_model, load_tokenizer, plan_for
from . import Gate, StageContext, StageResult

SMOKE_SAMPLES = 4
SMOKE_NEW_TOKENS = 8


@dataclass
class LoadedSet:
    spec: EvalSet
    kind: str  # "conversations" | "pairs"
    rows: list[dict[str, Any]]
    metrics: list[str] = field(default_factory=list)


def _read_file_set(cfg: Config, spec: EvalSet) -> tuple[str, list[dict[str, Any]]]:
    """A set given as a file: detect its format and convert every row; a bad row is an error naming
    its file and line (a held-out set with silently dropped rows would score something else)."""
    try:
        inputs = expand(cfg.path(spec.source), spec.source)
        rows = [r for inp in inputs for r in read_rows(inp)]  # an unreadable file is a SourceError too
    except SourceError as e:
        raise DataError(f"eval set {spec.name!r}: {e}") from None
    records = [r.record for r in rows if r.record is not None]
    if not records:
        raise DataError(f"eval set {spec.name!r}: {spec.source} has no rows")
    fmt = spec.format if spec.format not in (None, "auto") else None
    try:
        fmt = fmt or detect_format(records[:50], spec.columns, spec.source)
    except FormatError as e:
        raise DataError(f"eval set {spec.name!r}: {e}") from None
    kind = "pairs" if fmt in PREFERENCE_FORMATS else "conversations"
    out = []
    for r in rows:
        where = f"{r.file}:{r.line}"
        if r.record is None:
            raise DataError(f"eval set {spec.name!r}: {where}: {r.error}")
        try:
            if kind == "pairs":
                out.append(to_pair(r.record, fmt, spec.columns))
            else:
                out.append({"messages": to_conversation(r.record, fmt, spec.columns)})
        except (RowError, FormatError) as e:
            raise DataError(f"eval set {spec.name!r}: {where}: {e}") from None
    return kind, out


def _applicable(kind: str, names: list[str]) -> list[str]:
    if kind == "pairs":
        return [m for m in names if m in PREFERENCE_METRICS]
    return [m for m in names if m not in PREFERENCE_METRICS]


def load_sets(ctx: StageContext, limit: int | None) -> list[LoadedSet]:
    cfg, e = ctx.cfg, ctx.cfg.eval
    sets = []
    from . import registry

    prepared = {s.eval_split: s for s in registry.training_stages().values()}
    for spec in e.sets:
        if spec.source in prepared:
            stage = prepared[spec.source]
            if stage.data == "unpaired":
                raise DataError(
                    f"eval set {spec.name!r}: {spec.source} holds unpaired feedback (a completion and a "
                    "label), which has no reference reply or pair to score; use another set"
                )
            # Prompts with answers are scored as conversations (the answer is the reference reply).
            kind = "pairs" if stage.data == "pairs" else "conversations"
            rows = read_split(ctx.data_dir, spec.source)
        else:
            kind, rows = _read_file_set(cfg, spec)
        rows = rows[: limit or spec.max_samples or e.max_samples]
        wanted = spec.metrics if spec.metrics is not None else e.metrics
        metrics = _applicable(kind, wanted)
        if spec.metrics is not None and len(metrics) < len(spec.metrics):
            wrong = sorted(set(spec.metrics) - set(metrics))
            raise DataError(
                f"eval set {spec.name!r} holds {kind}; {', '.join(wrong)} cannot be computed on it "
                f"(preference sets take {', '.join(PREFERENCE_METRICS)}; conversation sets the others)"
            )
        if rows and metrics:
            sets.append(LoadedSet(spec, kind, rows, metrics))
    return sets


def _work(sets: list[LoadedSet], batch_size: int, shard: Shard = ONE_PROCESS) -> int:
    """Sequences this process evaluates per model: one per row for generation and for loss, two per
    pair; its share of their batches under several processes."""
    n = 0
    for s in sets:
        if s.kind == "pairs":
            n += shard_size(2 * len(s.rows), batch_size, shard)
        else:
            passes = any(m not in LIKELIHOOD_METRICS for m in s.metrics) + any(
                m in LIKELIHOOD_METRICS for m in s.metrics
            )
            n += passes * shard_size(len(s.rows), batch_size, shard)
    return n


class _Progress:
    """This process's share of a model's sequences: a bar in the main process, a count in each."""

    def __init__(self, total: int, desc: str, show: bool):
        self.bar = tqdm(total=total, desc=desc, unit="seq", disable=not show)
        self.n = 0

    def __call__(self, n: int) -> None:
        self.n += n
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _conversation_metrics(
    ctx: StageContext,
    model: Any,
    tok: Any,
    s: LoadedSet,
    max_new: int,
    progress: Callable[[int], None],
    shard: Shard,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    cfg, e = ctx.cfg, ctx.cfg.eval
    think = cfg.model.enable_thinking
    m: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    gen_metrics = [x for x in s.metrics if x not in LIKELIHOOD_METRICS]
    if gen_metrics:
        scorers = {
            metric_key(name): scorer_for(
                name, regex=s.spec.regex, tolerance=s.spec.numeric_tolerance, base_dir=cfg.path(".")
            )
            for name in gen_metrics
        }
        prompts = [prompt_text(tok, r["messages"], think) for r in s.rows]
        outputs = generate(
            model,
            tok,
            prompts,
            max_new,
            e.batch_size,
            progress,
            do_sample=e.do_sample,
            temperature=e.temperature,
            top_p=e.top_p,
            seed=e.seed,
            shard=shard,
        )
        for r, raw in zip(s.rows, outputs, strict=True):
            out = strip_thinking(raw) if e.strip_thinking else raw
            ref = reference_reply(r["messages"])
            sample = {"prompt": last_user_text(r["messages"]), "reference": ref, "output": out}
            sample["score"] = {k: score(fn, out, ref) for k, fn in scorers.items()}
            if out != raw:
                sample["raw_output"] = raw
            samples.append(sample)
        for k in scorers:
            m[k] = sum(x["score"][k] for x in samples) / len(samples)
    if any(x in LIKELIHOOD_METRICS for x in s.metrics):
        rows = s.rows
        if "input_ids" not in rows[0]:  # a file set: tokenized here, loss on the final reply
            pairs = [tokenize_conversation(tok, r["messages"], train_on="last") for r in rows]
            rows = [{"input_ids": ids, "labels": labels} for ids, labels in pairs]
        loss = assistant_loss(model, rows, tok.pad_token_id, e.batch_size, progress, shard=shard)
        if "loss" in s.metrics:
            m["loss"] = loss
        if "perplexity" in s.metrics:
            m["perplexity"] = math.exp(min(loss, 50.0))
    return m, samples


def _pair_metrics(
    ctx: StageContext, model: Any, tok: Any, s: LoadedSet, progress: Callable[[int], None], shard: Shard
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    margins = preference_margins(
        model, tok, s.rows, ctx.cfg.eval.batch_size, ctx.cfg.model.enable_thinking, progress, shard=shard
    )
    m: dict[str, float] = {}
    if "preference_accuracy" in s.metrics:
        m["preference_accuracy"] = sum(x > 0 for x in margins) / len(margins)
    if "reward_margin" in s.metrics:
        m["reward_margin"] = sum(margins) / len(margins)
    samples = [
        {
            "prompt": last_user_text(p["prompt"] + p["chosen"]),
            "chosen": reference_reply(p["chosen"]),
            "rejected": reference_reply(p["rejected"]),
            "margin": round(x, 4),
            "score": {"preference_accuracy": float(x > 0)},
        }
        for p, x in zip(s.rows, margins, strict=True)
    ]
    return m, samples


def run(ctx: StageContext) -> StageResult:
    cfg, out = ctx.cfg, ctx.stage_dir("eval")
    e = cfg.eval
    limit = SMOKE_SAMPLES if ctx.smoke else None
    max_new = min(e.max_new_tokens, SMOKE_NEW_TOKENS) if ctx.smoke else e.max_new_tokens
    sets = load_sets(ctx, limit)
    if not sets and not e.lm_eval:
        return StageResult(
            "no eval data",
            [
                Gate(
                    "metrics_written",
                    False,
                    "no held-out rows: set data.<stage>.eval or eval_split (e.g. data.sft.eval) or eval.sets",
                )
            ],
        )

    # Every process holds every result after each set (see evaluation._map_batches); only the main
    # process writes, so the run folder looks the same for any number of processes.
    dist.ensure_process_group()
    shard: Shard = (dist.rank(), dist.world_size())
    main = dist.is_main()
    plan = plan_for(cfg.model)
    tok = load_tokenizer(cfg, log=ctx.log)
    samples_dir = out / "samples"
    if main:
        samples_dir.mkdir(exist_ok=True)
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for which in e.models:
        model = load_stage_model(cfg, plan, ctx.run_dir, which, log=ctx.log).eval()
        metrics[which] = {}
        progress = _Progress(_work(sets, e.batch_size, shard), f"eval {which}", show=main)
        for s in sets:
            if s.kind == "pairs":
                m, samples = _pair_metrics(ctx, model, tok, s, progress, shard)
            else:
                m, samples = _conversation_metrics(ctx, model, tok, s, max_new, progress, shard)
            if main:
                _write_jsonl(samples_dir / f"{which}.{s.spec.name}.jsonl", samples)
            m["n"] = len(s.rows)
            metrics[which][s.spec.name] = {k: round(v, 4) for k, v in m.items()}
            ctx.log(f"  {which:4s} {s.spec.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
        progress.close()
        if shard[1] > 1:
            ctx.log(
                f"  {which:4s} process {shard[0]} of {shard[1]} evaluated {progress.n} of "
                f"{_work(sets, e.batch_size)} sequences"
            )
        if e.lm_eval:
            from ..benchmarks import run_lm_eval

            lm = e.lm_eval
            # lm-eval's own data parallelism needs a model it loads itself (with accelerate); this
            # one is in memory with the adapters merged, so the main process runs it alone and the
            # others wait for its numbers.
            results = dist.on_main(
                partial(
                    run_lm_eval,
                    model,
                    tok,
                    lm.tasks,
                    limit=SMOKE_SAMPLES if ctx.smoke else lm.limit,
                    num_fewshot=lm.num_fewshot,
                    include_path=cfg.path(lm.include_path) if lm.include_path else None,
                    batch_size=lm.batch_size,
                    log=ctx.log,
                )
            )
            for task, vals in results.items():
                metrics[which][task] = {k: round(v, 4) for k, v in vals.items()}
                ctx.log(f"  {which:4s} {task}: " + ", ".join(f"{k}={v:.4g}" for k, v in vals.items()))
        del model
        gc.collect()

    if main:
        tmp = out / ".metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(out / "metrics.json")
    values = [v for s in metrics.values() for mm in s.values() for v in mm.values()]
    finite = bool(values) and all(math.isfinite(v) for v in values)
    return StageResult(
        summary="; ".join(
            f"{w}: " + ", ".join(f"{k}={v}" for mm in s.values() for k, v in mm.items() if k != "n")
            for w, s in metrics.items()
        ),
        gates=[
            Gate("metrics_written", finite, "eval/metrics.json" if finite else "no or non-finite metrics")
        ],
        outputs={"metrics": "eval/metrics.json", "samples": "eval/samples/"},
    )
