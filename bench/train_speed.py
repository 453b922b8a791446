"""Benchmark: tunepipe's SFT and DPO stages side by side with plain TRL scripts (issue 7).

    make bench     # or: .venv/bin/python bench/train_speed.py [--repeats 3] [--stages sft,dpo] [--out F]

Generates mixed-length chat data (the quickstart skills plus paragraph rewrites, ~35-320 tokens) and
preference pairs, then per stage runs the contenders as subprocesses, interleaved A/B (tunepipe, TRL,
tunepipe, TRL, ...) --repeats times, with the embedded SmolLM2-135M-Instruct, identical LoRA (r 16, alpha 32,
dropout 0, all-linear), the same examples (one epoch), learning rate, micro-batch, accumulation and
max_length:

- tunepipe: its real path in one process (`run_pipeline` with the data stage then the training stage, what
  `tunepipe run` does) from a tunepipe.yaml written here; DPO with `sft.enabled: false`, so both DPO
  contenders start from the base weights. tunepipe's other settings are its defaults, except the LR
  schedule, set to TRL's (linear, no warmup) so the eval comparison is about the same optimisation.
- TRL: bench/trl_sft_plain.py and bench/trl_dpo_plain.py, written as TRL's documentation shows, TRL's
  defaults untouched (their docstrings list them).

Both processes get the same TrainMeter hook (bench/_common.py), which counts what each micro-batch holds
after the collator and times Trainer.train(). Reported per run and as medians: trained samples/s and
loss-bearing tokens/s (per second of trainer construction + train(), "fit"; per second of train() alone
too), padding share, peak RSS of the process, end-to-end wall time
of the process, final train loss; then the eval of each contender's adapter on held-out data (SFT:
assistant-token loss; DPO: preference accuracy and implicit-reward accuracy against the base model), the
median of the per-pair samples/s ratios, and PASS/FAIL against the targets (SFT >= 1.5x, DPO >= 1.3x, eval
not worse). Results go to --out as JSON (default: $TMPDIR/tunepipe-bench-train_speed.json); the work folder
(data, run folders, per-run logs) is deleted unless --keep.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    TrainMeter,
    chat_rows,
    emit,
    fmt,
    median,
    not_worse,
    pair_length,
    parse_result,
    preference_rows,
    table,
    verdict,
    write_jsonl,
)

BENCH = Path(__file__).resolve().parent
TARGETS = {"sft": 1.5, "dpo": 1.3}
# Columns of the side-by-side table: (result key, label).
METRICS = [
    ("samples_per_s", "trained samples/s"),
    ("samples_per_train_s", "samples/s in train()"),
    ("loss_tokens_per_s", "loss tokens/s"),
    ("padding_share", "padding share"),
    ("fit_s", "fit s (init+train)"),
    ("init_s", "trainer init s"),
    ("train_s", "train() s"),
    ("wall_s", "wall s (process)"),
    ("peak_rss_mb", "peak RSS MB"),
    ("examples", "examples trained"),
    ("loss_tokens", "loss tokens"),
    ("tokens_fed", "tokens fed"),
    ("final_loss", "final train loss"),
]


# --------------------------------------------------------------------------- the tunepipe contender


# Each optimization measured on its own (--ablate): tunepipe's defaults with one switch flipped. The
# first ones turn an optimization off; the "on" ones are what `auto` leaves off on CPU.
ABLATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "sft": [
        ("group_by_length off", {"sft.group_by_length": False}),
        ("lm_head_loss_positions_only off", {"sft.lm_head_loss_positions_only": False}),
        ("gradient_checkpointing on", {"sft.gradient_checkpointing": True}),
        ("bf16 autocast off (model.dtype float32)", {"model.dtype": "float32"}),
        ("padding_free on (block mask)", {"sft.padding_free": True}),
        ("packing on (block mask)", {"sft.packing": True}),
    ],
    "dpo": [
        ("group_by_length off", {"dpo.group_by_length": False}),
        ("lm_head_loss_positions_only off", {"dpo.lm_head_loss_positions_only": False}),
        ("gradient_checkpointing on", {"dpo.gradient_checkpointing": True}),
        ("bf16 autocast off (model.dtype float32)", {"model.dtype": "float32"}),
        ("reference precompute (not adapter)", {"dpo.reference": "precompute"}),
    ],
}


def tunepipe_config(
    work: Path,
    stage: str,
    run: str,
    data: Path,
    args: argparse.Namespace,
    model: str,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """A tunepipe.yaml for one run: the same shared settings as the TRL scripts' arguments, then
    `overrides` (dotted keys, as on tunepipe's command line)."""
    lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0, "target_modules": "all-linear"}
    section = {
        "method": "lora",
        "lora": lora,
        "num_train_epochs": 1,
        "learning_rate": args.sft_lr if stage == "sft" else args.dpo_lr,
        "per_device_train_batch_size": args.sft_batch if stage == "sft" else args.dpo_batch,
        "gradient_accumulation_steps": args.accum,
    }
    cfg = {
        "project": {"name": f"bench-{stage}", "output_dir": str(work / "runs" / run)},
        "model": {"name_or_path": model},
        "data": {
            stage: {"train": str(data)},
            "max_length": args.max_length,
            "truncation": "drop",
            "max_bad_rows": 0,
        },
        # TRL's schedule (linear, no warmup, seed 42) so the eval comparison is about the same optimisation.
        "training": {"seed": 42, "logging_steps": 1, "warmup_ratio": 0.0, "lr_scheduler_type": "linear"},
        "sft": section if stage == "sft" else {"enabled": False},
        "dpo": section if stage == "dpo" else {"enabled": False},
        "eval": {"models": ["base", stage], "sets": []},
    }
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = work / f"{run}.json"  # JSON is YAML: no yaml import needed here
    path.write_text(json.dumps(cfg, indent=2))
    return path


def tunepipe_child(config: str, stage: str) -> None:
    """Inside the subprocess: tunepipe's data stage then the training stage, with the meter installed."""
    meter = TrainMeter(started=STARTED).install()
    from tunepipe.config import load_config
    from tunepipe.pipeline import run_pipeline
    from tunepipe.stages import GateFailed

    cfg = load_config(config)
    t = time.perf_counter()
    run_pipeline(cfg, stages=["data"], force=True)
    data_s = time.perf_counter() - t
    try:
        run_pipeline(cfg, stages=[stage], force=True)
        gate = None
    except GateFailed as e:  # e.g. loss_falling on a few-step run: the adapter is saved, the speed counts
        gate = str(e)
    stage_dir = cfg.output_dir / stage
    losses = [json.loads(x).get("loss") for x in (stage_dir / "log.jsonl").read_text().splitlines() if x]
    outputs = json.loads((stage_dir / "stage.json").read_text()).get("outputs", {})
    losses = [x for x in losses if x is not None]
    emit(
        meter.result(
            losses[-1] if losses else None,
            contender="tunepipe",
            data_stage_s=round(data_s, 2),
            adapter=str(cfg.output_dir / outputs.get("result", f"{stage}/adapter")),
            stage_outputs=outputs,
            gate_failed=gate,
        )
    )


# --------------------------------------------------------------------------- running the contenders


def run_contender(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=BENCH.parent)
    wall = time.perf_counter() - t
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode} (log: {log}):\n{tail}")
    result = parse_result(proc.stdout)
    result["wall_s"] = round(wall, 2)
    return result


def commands(
    stage: str, work: Path, i: int, data: Path, args: argparse.Namespace, model_dir: str
) -> dict[str, list[str]]:
    py = sys.executable
    cfg = tunepipe_config(work, stage, f"tunepipe-{stage}-{i}", data, args, args.model)
    script = BENCH / ("trl_sft_plain.py" if stage == "sft" else "trl_dpo_plain.py")
    plain = [
        py,
        str(script),
        "--model",
        model_dir,
        "--data",
        str(data),
        "--out",
        str(work / "runs" / f"trl-{stage}-{i}"),
        "--lr",
        str(args.sft_lr if stage == "sft" else args.dpo_lr),
        "--batch",
        str(args.sft_batch if stage == "sft" else args.dpo_batch),
        "--accum",
        str(args.accum),
        "--max-length",
        str(args.max_length),
        "--lora-r",
        str(args.lora_r),
        "--lora-alpha",
        str(args.lora_alpha),
    ]
    ours = [py, str(Path(__file__).resolve()), "--child-tunepipe", str(cfg), "--stage", stage]
    return {"tunepipe": ours, "trl": plain}


def ablate(
    stage: str, work: Path, data: Path, args: argparse.Namespace, defaults: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each optimization on its own: one tunepipe run per ABLATIONS entry (the defaults with that one
    switch flipped), compared with the median of the defaults runs of this invocation."""
    base = median([r["samples_per_s"] for r in defaults]) or float("nan")
    out = []
    print(f"\n[{stage}] each optimization on its own: the defaults, one switch flipped", flush=True)
    for i, (label, overrides) in enumerate(ABLATIONS[stage]):
        run = f"tunepipe-{stage}-ablate-{i}"
        cfg = tunepipe_config(work, stage, run, data, args, args.model, overrides)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-tunepipe", str(cfg), "--stage", stage]
        r = run_contender(cmd, work / f"{run}.log", args.timeout)
        r.update(variant=label, overrides=overrides, vs_defaults=round(r["samples_per_s"] / base, 3))
        out.append(r)
        print(
            f"  {label:42s} {r['samples_per_s']:.3f} samples/s ({r['vs_defaults']:.2f}x the defaults), "
            f"padding {r['padding_share']:.1%}, loss {r['final_loss']}",
            flush=True,
        )
    rows = [
        ("defaults (median)", [base, 1.0, median([r["padding_share"] for r in defaults]), None, None]),
        *(
            (
                r["variant"],
                [r["samples_per_s"], r["vs_defaults"], r["padding_share"], r["final_loss"], r["peak_rss_mb"]],
            )
            for r in out
        ),
    ]
    print(
        table(rows, ["variant", "samples/s", "vs defaults", "padding", "final loss", "peak RSS MB"])
        + "\n(below 1.0x: the switch flipped costs speed, i.e. the default setting gains it)"
    )
    return out


# --------------------------------------------------------------------------- eval after training


def evaluate(
    stage: str, model_dir: str, adapters: dict[str, str], eval_rows: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """The same held-out eval for every contender's adapter (and the base model, for scale): SFT the mean
    loss per assistant token; DPO the preference accuracy (log p(chosen) > log p(rejected)), the implicit
    reward accuracy (the margin grew over the base model's, what DPO optimises) and the mean margin."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe.data.chat import tokenize_conversation
    from tunepipe.evaluation import assistant_loss, preference_margins

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out: dict[str, dict[str, float]] = {}
    base_margins: list[float] = []
    for name, adapter in {"base": "", **adapters}.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        if stage == "sft":
            rows = []
            for r in eval_rows:
                ids, labels = tokenize_conversation(tok, r["messages"])
                rows.append({"input_ids": ids, "labels": labels})
            out[name] = {"eval_loss": round(assistant_loss(model, rows, tok.pad_token_id, 8), 4)}
        else:
            margins = preference_margins(model, tok, eval_rows, 8)
            if name == "base":
                base_margins = margins
            out[name] = {
                "preference_accuracy": round(sum(m > 0 for m in margins) / len(margins), 4),
                "reward_accuracy": round(
                    sum(m > b for m, b in zip(margins, base_margins, strict=True)) / len(margins), 4
                ),
                "mean_margin": round(sum(margins) / len(margins), 3),
            }
        del model
    return out


# --------------------------------------------------------------------------- the report


def report_stage(
    stage: str, runs: dict[str, list[dict[str, Any]]], evals: dict[str, Any], n_eval: int
) -> dict:
    """Print the side-by-side table of one stage and return its summary."""
    names = ["tunepipe", "trl"]
    rows = []
    for key, label in METRICS:
        meds = [median([r.get(key) for r in runs[n]]) for n in names]
        ratio = meds[0] / meds[1] if meds[0] is not None and meds[1] else None
        per_run = " | ".join(n + " " + ", ".join(fmt(r.get(key)) for r in runs[n]) for n in names)
        rows.append((label, [*meds, ratio, per_run]))
    print(f"\n== {stage.upper()}: median of {len(runs['tunepipe'])} interleaved runs per contender ==")
    print(table(rows, ["metric", "tunepipe", "trl", "ratio", "per run"]))
    v = verdict(
        [r["samples_per_s"] for r in runs["tunepipe"]],
        [r["samples_per_s"] for r in runs["trl"]],
        TARGETS[stage],
    )
    wall = verdict(
        [1 / r["wall_s"] for r in runs["tunepipe"]], [1 / r["wall_s"] for r in runs["trl"]], TARGETS[stage]
    )
    only_train = verdict(
        [r["samples_per_train_s"] for r in runs["tunepipe"]],
        [r["samples_per_train_s"] for r in runs["trl"]],
        TARGETS[stage],
    )
    print(v.line(f"{stage} trained samples/s (per fit second) tunepipe/trl"))
    print(f"  (per second of train() alone: {only_train.ratio or float('nan'):.2f}x)")
    print(
        f"{stage} end-to-end wall speed-up (process incl. imports, load, data): "
        f"{wall.ratio:.2f}x (per pair {', '.join(f'{r:.2f}' for r in wall.ratios)})"
        if wall.ratio
        else ""
    )
    if stage == "sft":
        key, higher, tol = "eval_loss", False, 0.02
    else:
        key, higher, tol = "reward_accuracy", True, 1.0 / max(n_eval, 1)
    eval_rows = [(name, [evals[name].get(k) for k in evals["base"]]) for name in ("base", "tunepipe", "trl")]
    print(table(eval_rows, ["eval (held-out)", *evals["base"]]))
    ok = not_worse(evals["tunepipe"][key], evals["trl"][key], higher, tol)
    print(
        f"{stage} eval {key}: tunepipe {evals['tunepipe'][key]} vs trl {evals['trl'][key]} "
        f"({'higher' if higher else 'lower'} is better, tolerance {tol:.3f}): {'PASS' if ok else 'FAIL'}"
    )
    return {
        "runs": runs,
        "eval": evals,
        "samples_per_s_ratio": v.ratio,
        "samples_per_s_pair_ratios": v.ratios,
        "samples_per_train_s_ratio": only_train.ratio,
        "wall_speedup": wall.ratio,
        "target": v.target,
        "speed_pass": v.passed,
        "eval_metric": key,
        "eval_pass": ok,
        "pass": v.passed and ok,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per contender (median reported)")
    ap.add_argument("--stages", default="sft,dpo")
    ap.add_argument("--sft-examples", type=int, default=16)
    ap.add_argument("--dpo-pairs", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=16, help="held-out conversations / pairs for the eval")
    ap.add_argument("--min-tokens", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--dpo-lr", type=float, default=5e-4)
    ap.add_argument("--sft-batch", type=int, default=4)
    ap.add_argument("--dpo-batch", type=int, default=2)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per contender run")
    ap.add_argument("--out", type=Path, help="write the results JSON here (default: inside the work folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (data, run folders, logs)")
    ap.add_argument(
        "--ablate",
        action="store_true",
        help="also run tunepipe once per optimization switched on its own (see ABLATIONS)",
    )
    ap.add_argument("--child-tunepipe", help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_tunepipe:
        tunepipe_child(args.child_tunepipe, args.stage)
        return

    from transformers import AutoTokenizer

    from tunepipe.quickstart.model import resolve_model_path

    model_dir = resolve_model_path(args.model)  # imports the embedded model once, outside any timing
    tok = AutoTokenizer.from_pretrained(model_dir)

    def count(messages: list[dict[str, str]]) -> int:
        text = tok.apply_chat_template(messages, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    tmp = tempfile.mkdtemp(prefix="tunepipe-bench-")
    work = Path(tmp)
    lo, hi = args.min_tokens, args.max_tokens
    summary: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("child") and k != "out"},
        "cpus": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
    }
    summary["settings"]["out"] = str(args.out) if args.out else None
    print(f"work folder {work}; model {model_dir}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
    try:
        for stage in stages:
            if stage == "sft":
                train = chat_rows(args.sft_examples, seed=0, lo=lo, hi=hi, count=count)
                held = chat_rows(args.eval_rows, seed=1000, lo=lo, hi=hi, count=count)
                lengths = sorted(count(r["messages"]) for r in train)
            else:
                train = preference_rows(args.dpo_pairs, seed=0, lo=lo, hi=hi, count=count)
                held = preference_rows(args.eval_rows, seed=1000, lo=lo, hi=hi, count=count)
                lengths = sorted(pair_length(r, count) for r in train)
            data = work / f"{stage}_train.jsonl"
            write_jsonl(data, train)
            print(
                f"\n[{stage}] {len(train)} training rows, tokens min {lengths[0]} median "
                f"{lengths[len(lengths) // 2]} max {lengths[-1]}; {len(held)} held-out rows"
            )
            runs: dict[str, list[dict[str, Any]]] = {"tunepipe": [], "trl": []}
            for i in range(args.repeats):
                for name, cmd in commands(stage, work, i, data, args, model_dir).items():
                    r = run_contender(cmd, work / f"{name}-{stage}-{i}.log", args.timeout)
                    runs[name].append(r)
                    print(
                        f"  run {i + 1}/{args.repeats} {name:8s} {r['samples_per_s']:.2f} samples/s, "
                        f"train {r['train_s']:.1f} s, wall {r['wall_s']:.1f} s, "
                        f"padding {r['padding_share']:.1%}, "
                        f"loss {r['final_loss']}, load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
            # Training is seeded and deterministic: the first run of each contender stands for its adapter.
            evals = evaluate(stage, model_dir, {n: runs[n][0]["adapter"] for n in runs}, held)
            summary[stage] = report_stage(stage, runs, evals, len(held))
            if args.ablate:
                summary[stage]["ablation"] = ablate(stage, work, data, args, runs["tunepipe"])
        summary["load_avg_end"] = os.getloadavg()
        summary["total_s"] = round(time.perf_counter() - STARTED, 1)
        verdicts = [f"{s}: {'PASS' if summary[s]['pass'] else 'FAIL'}" for s in stages]
        print(f"\ntotal {summary['total_s']:.0f} s; " + "; ".join(verdicts))
        print(
            "(timings are only comparable within this invocation: the runs alternate so that machine load "
            "hits both contenders alike)"
        )
    finally:
        out = args.out or Path(tempfile.gettempdir()) / "tunepipe-bench-train_speed.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2, default=str))
        print(f"results: {out}" + ("" if args.keep else "; work folder removed (--keep keeps it)"))
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
