"""Benchmarks through lm-evaluation-harness, on a model already in memory (the base model, or the
base with the run's adapters merged), so the numbers sit next to tunepipe's own eval sets.

lm-eval is an optional dependency (`pip install lm-eval`). Local task definitions (`include_path`)
make it work offline; relative `data_files` in those YAMLs are read from the include_path folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class BenchmarkError(RuntimeError):
    """lm-eval missing, a task it does not know, or a task that failed to load."""


@contextlib.contextmanager
def _cwd(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _local_task_names(include_path: Path) -> set[str]:
    import yaml

    names = set()
    for f in include_path.rglob("*.yaml"):
        try:
            doc = yaml.safe_load(f.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict):
            for key in ("task", "group"):
                if isinstance(doc.get(key), str):
                    names.add(doc[key])
    return names


def flatten_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's {"task": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}} ->
    {"task": {"acc": 0.5, "acc_stderr": 0.1}} (the filter name is kept when it is not `none`)."""
    out: dict[str, dict[str, float]] = {}
    for task, vals in results.items():
        row: dict[str, float] = {}
        for key, v in vals.items():
            if not isinstance(v, int | float) or isinstance(v, bool) or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else f"{metric}_{filt}"] = float(v)
        if row:
            out[task] = row
    return out


def run_lm_eval(
    model: Any,
    tok: Any,
    tasks: list[str],
    *,
    limit: float | None,
    num_fewshot: int | None,
    include_path: Path | None,
    batch_size: int,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BenchmarkError(
            "eval.lm_eval needs lm-evaluation-harness: pip install lm-eval  (or remove eval.lm_eval)"
        ) from None
    if include_path is not None and not include_path.is_dir():
        raise BenchmarkError(f"eval.lm_eval.include_path: {include_path} is not a folder")
    # Indexing lm-eval's thousands of built-in task files takes a while: skip it when every task is local.
    local = _local_task_names(include_path) if include_path else set()
    manager = TaskManager(
        include_path=str(include_path) if include_path else None, include_defaults=not set(tasks) <= local
    )
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BenchmarkError(
            f"eval.lm_eval.tasks: unknown task(s) {', '.join(unknown)}; "
            "list them with `lm-eval ls tasks`, or define them in a YAML under eval.lm_eval.include_path"
        )
    device = str(model.device)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
    log(f"  lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''}: {', '.join(tasks)}")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    with _cwd(include_path):
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=0,  # stderr by bootstrap costs minutes; lm-eval's closed-form stderr stays
            log_samples=False,
        )
    if not out or "results" not in out:
        raise BenchmarkError(f"lm-eval returned no results for {', '.join(tasks)}")
    return flatten_results(out["results"])
