"""Experiment trackers (`training.report_to`): the integration names transformers knows and the package
each needs, where each writes by default (under the run folder), the run names and environment
defaults a training stage runs under, and the callback that logs the resolved config to each tracker.

The trackers are transformers' own callbacks (TensorBoardCallback, WandbCallback, MLflowCallback, ...);
tunepipe only chooses their defaults and adds the config. Defaults are environment variables the
trackers read, set for the duration of a training stage when the user has not set them, then removed.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True)
class Tracker:
    name: str  # transformers' report_to name
    # Import names it needs: one module of each group (tensorboard: torch's writer or tensorboardX).
    needs: tuple[tuple[str, ...], ...]
    install: str  # the pip command that provides them


# transformers' INTEGRATION_TO_CALLBACK names (transformers 5.24), with their packages. A name a newer
# transformers adds is accepted too (read from transformers when it is not listed here); its package
# is then assumed to have the tracker's own name. tests/test_trackers.py compares the two lists.
TRACKERS: dict[str, Tracker] = {
    t.name: t
    for t in (
        Tracker("tensorboard", (("tensorboard", "tensorboardX"),), "pip install tensorboard"),
        Tracker("wandb", (("wandb",),), "pip install wandb"),
        Tracker("mlflow", (("mlflow",),), "pip install mlflow-skinny (or mlflow)"),
        Tracker("trackio", (("trackio",),), "pip install trackio"),
        Tracker("comet_ml", (("comet_ml",),), "pip install comet-ml"),
        Tracker("clearml", (("clearml",),), "pip install clearml"),
        Tracker("dvclive", (("dvclive",),), "pip install dvclive"),
        Tracker("neptune", (("neptune",),), "pip install neptune"),
        Tracker("swanlab", (("swanlab",),), "pip install swanlab"),
        Tracker("codecarbon", (("codecarbon",),), "pip install codecarbon"),
        Tracker("azure_ml", (("azureml.core",),), "pip install azureml-core"),
        Tracker("dagshub", (("dagshub",), ("mlflow",)), "pip install dagshub mlflow"),
        Tracker(
            "flyte",
            (("flytekit",), ("flytekitplugins.deck",)),
            "pip install flytekit flytekitplugins-deck-standard",
        ),
        # Set up by the Kubeflow controller (KUBEFLOW_TRAINER_SERVER_URL); transformers adds it by itself.
        Tracker("kubeflow", (), ""),
    )
}

# MLflow's local store (MLflow 3 refuses the file store without MLFLOW_ALLOW_FILE_STORE): SQLite,
# which needs these two besides mlflow-skinny (the full `mlflow` package brings them).
MLFLOW_SQLITE_NEEDS = ("sqlalchemy", "alembic")
MLFLOW_SQLITE_INSTALL = "pip install sqlalchemy alembic (or the full `pip install mlflow`)"


def transformers_trackers() -> list[str]:
    """The report_to names the installed transformers knows (importing it takes seconds: torch)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return list(INTEGRATION_TO_CALLBACK)


def check_tracker(name: str) -> str:
    """`name` if transformers reports to it, else ValueError with the closest name."""
    if name in TRACKERS:
        return name
    try:
        known = transformers_trackers()
    except ImportError:
        known = []
    if name in known:
        return name
    names = sorted({*TRACKERS, *known})
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown tracker {name!r}{hint} (trackers: {', '.join(names)})")


def tracker(name: str) -> Tracker:
    return TRACKERS.get(name) or Tracker(name, ((name,),), f"pip install {name}")


def mlflow_store_is_local() -> bool:
    """Whether MLflow will write the local SQLite store tunepipe defaults to (no MLFLOW_TRACKING_URI)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return not uri or uri.startswith("sqlite:")


# --------------------------------------------------------------------------- where each one writes


def run_name(cfg: Config, stage: str) -> str:
    return f"{cfg.project.name}/{stage}"


def mlflow_uri(run_dir: Path) -> str:
    return "sqlite:///" + (run_dir / "mlruns" / "mlflow.db").as_posix()


def env_defaults(
    cfg: Config, stage: str, run_dir: Path, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment variables a training stage sets because the user has not: each tracker of
    training.report_to writes under the run folder and names the project. Never a secret."""
    environ = os.environ if environ is None else environ
    on = set(cfg.training.report_to)
    want: dict[str, str] = {}
    if "tensorboard" in on:
        # transformers >= 5 has no TrainingArguments.logging_dir: its callback reads this variable.
        want["TENSORBOARD_LOGGING_DIR"] = str(run_dir / stage / "tensorboard")
    if "wandb" in on:
        want["WANDB_PROJECT"] = cfg.project.name
        want["WANDB_DIR"] = str(run_dir)  # runs go to <run>/wandb/ (offline ones too)
    if "mlflow" in on:
        want["MLFLOW_EXPERIMENT_NAME"] = cfg.project.name
        want["MLFLOW_TRACKING_URI"] = mlflow_uri(run_dir)
    if "trackio" in on:
        want["TRACKIO_DIR"] = str(run_dir / "trackio")
    return {k: v for k, v in want.items() if not environ.get(k)}


def destinations(cfg: Config, stage: str, run_dir: Path) -> dict[str, str]:
    """{tracker: where it writes} for this stage, after the defaults (doctor and the stage's log line)."""
    env = {**os.environ, **env_defaults(cfg, stage, run_dir)}
    out = {}
    for name in cfg.training.report_to:
        if name == "tensorboard":
            out[name] = env["TENSORBOARD_LOGGING_DIR"]
        elif name == "wandb":
            mode = env.get("WANDB_MODE") or "online"
            out[name] = f"project {env['WANDB_PROJECT']}, {mode}, files in {Path(env['WANDB_DIR']) / 'wandb'}"
        elif name == "mlflow":
            uri = re.sub(r"//[^/@]+@", "//***@", env["MLFLOW_TRACKING_URI"])  # user:password@ stays out
            out[name] = f"experiment {env['MLFLOW_EXPERIMENT_NAME']} at {uri}"
        elif name == "trackio":
            out[name] = f"project {cfg.project.name} in {env['TRACKIO_DIR']}"
        else:
            out[name] = "its own defaults"
    return out


def trainer_kwargs(cfg: Config, stage: str) -> dict[str, Any]:
    """TrainingArguments for the trackers: which ones, and the names they show."""
    return {
        "report_to": list(cfg.training.report_to) or "none",
        "run_name": run_name(cfg, stage),
        "project": cfg.project.name,  # trackio's project (transformers' default: "huggingface")
    }


@contextlib.contextmanager
def reporting(cfg: Config, stage: str, run_dir: Path, log: Callable[[str], None]) -> Iterator[None]:
    """While training stage `stage` runs: the trackers' environment defaults set (and removed after),
    MLflow's local experiment created with its artifacts under the run folder, and any tracker run
    still open at the end (a stage that failed) closed, so the next stage starts its own."""
    if not cfg.training.report_to:
        yield
        return
    from .dist import is_main

    defaults = env_defaults(cfg, stage, run_dir)
    if is_main():
        where = destinations(cfg, stage, run_dir)
        log(f"{stage}: reporting to " + "; ".join(f"{k} ({v})" for k, v in where.items()))
    os.environ.update(defaults)
    failed = False
    try:
        if is_main() and defaults.get("MLFLOW_TRACKING_URI"):
            _create_mlflow_experiment(
                defaults["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_EXPERIMENT_NAME"], run_dir
            )
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _close_open_runs(failed)
        for k in defaults:
            os.environ.pop(k, None)


def _create_mlflow_experiment(uri: str, name: str, run_dir: Path) -> None:
    """The experiment of the local store, with its artifacts under <run>/mlruns/artifacts (MLflow's
    default would be ./mlruns in the working directory)."""
    (run_dir / "mlruns").mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(
            name, artifact_location=(run_dir / "mlruns" / "artifacts").resolve().as_uri()
        )


def _close_open_runs(failed: bool) -> None:
    """transformers' WandbCallback leaves its run open after training (the next stage would log into
    it); MLflow's stays open after an error."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and callable(getattr(mlflow, "active_run", None)) and mlflow.active_run():
        mlflow.end_run(status="FAILED" if failed else "FINISHED")


# --------------------------------------------------------------------------- the config in each tracker


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "l": [{"x": 2}], "s": [1, 2]} -> {"a.b": 1, "l.0.x": 2, "s": "[1, 2]"}: dotted
    keys; lists of plain values stay one value (as JSON)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and any(isinstance(v, dict | list) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = json.dumps(obj) if isinstance(obj, list) else obj
    return out


def mlflow_params(resolved: dict[str, Any], max_value: int) -> dict[str, str]:
    """The config as MLflow params: 'tunepipe.<dotted key>', values as text cut to MLflow's limit."""
    params = {}
    for key, value in flatten(resolved).items():
        text = "null" if value is None else str(value)
        params[re.sub(r"[^\w\-. /]", "_", f"tunepipe.{key}")] = text[:max_value]
    return params


def config_markdown(resolved: dict[str, Any]) -> str:
    """TensorBoard's text tab renders Markdown: the YAML as a code block (indented four spaces)."""
    text = yaml.safe_dump(resolved, sort_keys=False)
    return "\n".join("    " + line for line in text.splitlines())


def _config_callback_class() -> type:
    from transformers import TrainerCallback

    class ConfigToTrackers(TrainerCallback):
        """Logs the resolved config (redacted, as config.resolved.yaml) to the trackers the trainer
        reports to, on the main process, once their callbacks (earlier in the list) have started
        their runs in on_train_begin."""

        def __init__(self, handler: Any, resolved: dict[str, Any], log: Callable[[str], None]):
            self.handler, self.resolved, self.log = handler, resolved, log

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            from transformers.integrations import integration_utils as iu

            for cb in self.handler.callbacks:
                for cls_name, send in (
                    ("TensorBoardCallback", self._tensorboard),
                    ("WandbCallback", self._wandb),
                    ("MLflowCallback", self._mlflow),
                    ("TrackioCallback", self._trackio),
                ):
                    cls = getattr(iu, cls_name, None)
                    if cls is not None and type(cb) is cls:
                        try:
                            send(cb)
                        except Exception as e:  # a tracker's hiccup must not stop the training
                            self.log(f"could not log the config to {cls_name[: -len('Callback')]}: {e}")

        def _tensorboard(self, cb: Any) -> None:
            if cb.tb_writer is not None:
                cb.tb_writer.add_text("tunepipe/config", config_markdown(self.resolved))
                cb.tb_writer.flush()

        def _wandb(self, cb: Any) -> None:
            import wandb

            if wandb.run is not None:
                wandb.run.config.update({"tunepipe": self.resolved}, allow_val_change=True)

        def _mlflow(self, cb: Any) -> None:
            import mlflow
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

            if mlflow.active_run() is None:
                return
            items = list(mlflow_params(self.resolved, MAX_PARAM_VAL_LENGTH).items())
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                mlflow.log_params(dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH]))

        def _trackio(self, cb: Any) -> None:
            import trackio

            trackio.config.update({"tunepipe": self.resolved}, allow_val_change=True)

    return ConfigToTrackers


def attach(trainer: Any, cfg: Config, log: Callable[[str], None]) -> None:
    """Add the config logger after the trainer's tracker callbacks (a trainer reporting nowhere: none)."""
    if not cfg.training.report_to or not hasattr(trainer, "add_callback"):
        return
    from .config import resolved_dict

    trainer.add_callback(_config_callback_class()(trainer.callback_handler, resolved_dict(cfg), log))
