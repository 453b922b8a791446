"""`tunepipe export`: a trained stage's result as a standalone Hugging Face model folder.

The adapters of the run are merged into the base weights in pipeline order (each stage's adapter
was trained on the merged result of the stages before it), and the folder gets the tokenizer with
its chat template, so plain
`AutoModelForCausalLM.from_pretrained(DIR)` needs nothing from tunepipe. Written to a temporary
folder and renamed, so an interrupted export never looks finished.

`fmt="gguf"` writes the same merged model as one GGUF file plus an Ollama Modelfile instead
(gguf_export.py), for llama.cpp, Ollama and LM Studio.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from .config import Config
from .modeling import load_stage_model, load_tokenizer, model_path, plan_for
from .stages import registry

FORMATS = ("hf", "gguf")


class StageNotDone(Exception):
    """The stage asked for is not a trained stage of the config, or has not finished (exit code 2)."""


def check_stage(cfg: Config, run_dir: Path, stage: str) -> None:
    """StageNotDone unless `stage` is a stage of this config that finished in `run_dir`."""
    trained = registry.trained(cfg)
    config = cfg.source
    if stage not in trained:
        raise StageNotDone(
            f"--stage {stage}: not a trained stage of {config} (pipeline: {', '.join(trained) or 'none'})"
        )
    # pipeline.json is the run's record (a stage whose inputs were rerun since is "stale" there).
    pipeline = run_dir / "pipeline.json"
    record = json.loads(pipeline.read_text()).get("stages", {}).get(stage) if pipeline.is_file() else None
    stage_json = run_dir / stage / "stage.json"
    if record is None and stage_json.is_file():
        record = json.loads(stage_json.read_text())
    status = (record or {}).get("status")
    if status != "done":
        from .pipeline import run_dir_for

        smoke = " --smoke" if run_dir == run_dir_for(cfg, True) else ""
        state = f"is {status}" if status else "has not run"
        raise StageNotDone(
            f"stage {stage} {state} in {run_dir}: run `tunepipe run {config}{smoke}` "
            f"(or `tunepipe train {config} --stage {stage}{smoke}`) first"
        )


def default_out(run_dir: Path, stage: str, fmt: str = "hf") -> Path:
    return run_dir / (f"export-{stage}" if fmt == "hf" else f"export-{stage}-{fmt}")


def export_model(
    cfg: Config,
    run_dir: Path,
    stage: str,
    out: Path,
    log: Callable[[str], None] = print,
    fmt: str = "hf",
    quant: str | None = None,
) -> Path:
    """The merged `stage` model in `out`: a safetensors folder (`hf`) or a GGUF file and an Ollama
    Modelfile (`gguf`; `quant` defaults to bf16 for a bf16 model, else f16). Returns `out`."""
    from .gguf_export import GGUFExportError, check_architecture, check_quant, default_quant

    if fmt not in FORMATS:
        raise GGUFExportError(f"--format '{fmt}' is not one of {', '.join(FORMATS)}")
    if fmt == "hf" and quant is not None:
        raise GGUFExportError(
            "--quant applies to --format gguf only (the hf export keeps the weights as trained)"
        )
    if fmt == "gguf":
        # Fail before the merge, which can take minutes on a large model.
        from transformers import AutoConfig

        if quant is not None:
            check_quant(quant)
        check_architecture(AutoConfig.from_pretrained(model_path(cfg, log=log)).model_type)
    check_stage(cfg, run_dir, stage)  # before loading anything
    if fmt == "gguf":
        out = out.resolve()
        hf_dir = out.with_name(f".{out.name}.hf-tmp")
        _export_hf(cfg, run_dir, stage, hf_dir, log=log, announce=False)
        try:
            done = _export_gguf(hf_dir, out, stage, quant or default_quant(hf_dir), log)
        finally:
            shutil.rmtree(hf_dir, ignore_errors=True)
    else:
        done = _export_hf(cfg, run_dir, stage, out, log)
    from .modelcard import write_model_card

    card = write_model_card(cfg, run_dir, stage, done, fmt=fmt)
    log(f"  model card: {card}")
    return done


def _export_gguf(hf_dir: Path, out: Path, stage: str, quant: str, log: Callable[[str], None]) -> Path:
    from .gguf_export import export_gguf

    meta = json.loads((hf_dir / "tunepipe-export.json").read_text())
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    name = f"{Path(str(meta['base'])).name}-{stage}"
    file = export_gguf(hf_dir, tmp, quant, name=name, log=log)
    (tmp / "tunepipe-export.json").write_text(
        json.dumps({**meta, "format": "gguf", "quant": quant}, indent=2)
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"exported the {stage} model to {out / file.name} ({quant}), with an Ollama Modelfile")
    log(f"  ollama create NAME -f {out / 'Modelfile'}")
    return out


def _export_hf(
    cfg: Config, run_dir: Path, stage: str, out: Path, log: Callable[[str], None], announce: bool = True
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
    if announce:
        log(f"exported the {stage} model to {out}")
    return out
