"""`tunepipe export`: a trained stage's result as a standalone Hugging Face model folder.

The adapters of the run are merged into the base weights in pipeline order (each stage's adapter
was trained on the merged result of the stages before it), and the folder gets the tokenizer with
its chat template, so plain
`AutoModelForCausalLM.from_pretrained(DIR)` needs nothing from tunepipe. Written to a temporary
folder and renamed, so an interrupted export never looks finished.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from .config import Config
from .modeling import load_stage_model, load_tokenizer, plan_for


def export_model(
    cfg: Config, run_dir: Path, stage: str, out: Path, log: Callable[[str], None] = print
) -> Path:
    import torch

    plan = plan_for(cfg.model)
    if cfg.model.load_in_4bit:
        # Merging into 4-bit weights would round the adapter away: merge into a full-precision base.
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"load_in_4bit": False})})
    model = load_stage_model(cfg, plan, run_dir, stage, log=log)
    tok = load_tokenizer(cfg, log=log)
    out = out.resolve()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = torch.bfloat16 if plan.dtype == "bfloat16" else None
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "tunepipe-export.json").write_text(
        json.dumps({"stage": stage, "run_dir": str(run_dir), "base": cfg.model.name_or_path}, indent=2)
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"exported the {stage} model to {out}")
    return out
