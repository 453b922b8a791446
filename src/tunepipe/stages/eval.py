"""Stage `eval`: base, SFT and DPO models on the held-out sets.

`sft_eval` (conversations) gives exact_match and loss; `dpo_eval` (pairs) gives preference_accuracy.
Writes `eval/metrics.json` as {model: {set: {metric: value}}} and `eval/samples/<model>_<set>.jsonl`.
Gate: metrics written and finite.
"""

from __future__ import annotations

import gc
import json
import math

from tqdm.auto import tqdm

from ..data.prepare import read_split
from ..evaluation import assistant_loss, exact_match, preference_accuracy
from ..modeling import load_stage_model, load_tokenizer, plan_for
from . import Gate, StageContext, StageResult

SMOKE_SAMPLES = 4
SMOKE_NEW_TOKENS = 8


def _work(sets: dict[str, list], metrics: list[str]) -> int:
    """Sequences each model processes: one per row per metric, two per preference pair."""
    n = 0
    if "sft_eval" in sets:
        n += len(sets["sft_eval"]) * (("exact_match" in metrics) + ("loss" in metrics))
    if "dpo_eval" in sets and "preference_accuracy" in metrics:
        n += 2 * len(sets["dpo_eval"])
    return n


def run(ctx: StageContext) -> StageResult:
    cfg, out = ctx.cfg, ctx.stage_dir("eval")
    e = cfg.eval
    limit = SMOKE_SAMPLES if ctx.smoke else e.max_samples
    max_new = min(e.max_new_tokens, SMOKE_NEW_TOKENS) if ctx.smoke else e.max_new_tokens
    sets = {name: read_split(ctx.data_dir, name)[:limit] for name in e.sets}
    sets = {k: v for k, v in sets.items() if v}
    if not sets:
        return StageResult(
            "no eval data",
            [
                Gate(
                    "metrics_written",
                    False,
                    "no held-out rows: set data.sft.eval / data.dpo.eval or eval_split",
                )
            ],
        )

    plan = plan_for(cfg.model)
    tok = load_tokenizer(cfg, log=ctx.log)
    think = cfg.model.enable_thinking
    (out / "samples").mkdir(exist_ok=True)
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for which in e.models:
        model = load_stage_model(cfg, plan, ctx.run_dir, which, log=ctx.log).eval()
        metrics[which] = {}
        bar = tqdm(total=_work(sets, e.metrics), desc=f"eval {which}", unit="seq")
        for name, rows in sets.items():
            m: dict[str, float] = {}
            if name == "sft_eval":
                if "exact_match" in e.metrics:
                    m["exact_match"], samples = exact_match(
                        model, tok, rows, max_new, e.batch_size, think, bar.update
                    )
                    with (out / "samples" / f"{which}_{name}.jsonl").open("w") as fh:
                        fh.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
                if "loss" in e.metrics:
                    m["loss"] = assistant_loss(model, rows, tok.pad_token_id, e.batch_size, bar.update)
            elif name == "dpo_eval" and "preference_accuracy" in e.metrics:
                m["preference_accuracy"], margins = preference_accuracy(
                    model, tok, rows, e.batch_size, think, bar.update
                )
                m["mean_logp_margin"] = sum(margins) / len(margins)
            m["n"] = len(rows)
            metrics[which][name] = {k: round(v, 4) for k, v in m.items()}
            ctx.log(f"  {which:4s} {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
        bar.close()
        del model
        gc.collect()

    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(out / "metrics.json")
    finite = all(math.isfinite(v) for s in metrics.values() for mm in s.values() for v in mm.values())
    return StageResult(
        summary="; ".join(
            f"{w}: " + ", ".join(f"{k}={v}" for mm in s.values() for k, v in mm.items() if k != "n")
            for w, s in metrics.items()
        ),
        gates=[Gate("metrics_written", finite, "eval/metrics.json" if finite else "non-finite metric")],
        outputs={"metrics": "eval/metrics.json"},
    )
