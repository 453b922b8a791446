"""Experiment trackers (training.report_to): the config key, the preflight's package check, the run
names and environment defaults, and one real SFT run on a tiny model reporting to TensorBoard, W&B
(offline) and MLflow (the local store), read back from the files each one wrote."""

from __future__ import annotations

import importlib.machinery
import json
import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import write_config

from tunepipe import trackers
from tunepipe.config import ConfigError, load_config

# --------------------------------------------------------------------------- config (no model)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tensorboard", ["tensorboard"]),
        ("[tensorboard, wandb, mlflow]", ["tensorboard", "wandb", "mlflow"]),
        ("[wandb, wandb]", ["wandb"]),
        ("none", []),
        ("[none]", []),
        ("[]", []),
    ],
)
def test_report_to_takes_a_list_a_single_name_or_none(value: str, expected: list[str]):
    assert load_config(None, [f"training.report_to={value}"]).training.report_to == expected


def test_report_to_is_empty_by_default_and_trains_with_report_to_none():
    cfg = load_config(None)
    assert cfg.training.report_to == []
    assert trackers.trainer_kwargs(cfg, "sft") == {
        "report_to": "none",
        "run_name": "tunepipe-project/sft",
        "project": "tunepipe-project",
    }


def test_an_unknown_tracker_is_a_config_error_naming_the_key_and_the_closest_name(tmp_path: Path):
    path = tmp_path / "t.yaml"
    path.write_text("training:\n  report_to: [tensorbord]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{path}: training.report_to: unknown tracker 'tensorbord'" in msg
    assert "did you mean 'tensorboard'?" in msg and "wandb" in msg


@pytest.mark.parametrize(
    ("value", "says"), [("all", "'all' is not accepted"), ("[none, wandb]", "'none' cannot")]
)
def test_all_and_none_among_trackers_are_refused(value: str, says: str):
    with pytest.raises(ConfigError, match=says):
        load_config(None, [f"training.report_to={value}"])


def test_the_known_trackers_are_transformers_integrations():
    # The table that maps names to packages covers exactly what the installed transformers reports to.
    assert set(trackers.TRACKERS) == set(trackers.transformers_trackers())


def test_the_cli_exits_2_on_an_unknown_tracker(tmp_path: Path):
    from conftest import tunepipe

    path = tmp_path / "t.yaml"
    path.write_text("training:\n  report_to: wandbb\n")
    proc = tunepipe("run", path)
    assert proc.returncode == 2
    assert "unknown tracker 'wandbb'" in proc.stdout + proc.stderr
    assert "did you mean 'wandb'?" in proc.stdout + proc.stderr


def test_adding_a_tracker_does_not_change_a_training_stages_fingerprint():
    from tunepipe.pipeline import fingerprint

    plain = load_config(None, ["pipeline=[sft]"])
    tracked = load_config(None, ["pipeline=[sft]", "training.report_to=[wandb]"])
    changed = load_config(None, ["pipeline=[sft]", "training.seed=1"])
    fps = [fingerprint(c, "sft", {"data": "d"}, False, "code") for c in (plain, tracked, changed)]
    assert fps[0] == fps[1] != fps[2]


# --------------------------------------------------------------------------- preflight (no model)


def test_preflight_names_a_missing_tracker_package_and_its_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from tunepipe.preflight import PreflightFailed, require

    cfg = load_config(
        None, ["training.report_to=[tensorboard, wandb]", f"project.output_dir={tmp_path / 'run'}"]
    )
    # Simulates an uninstalled wandb: a module set to None in sys.modules is how Python reports a
    # missing package (find_spec returns None, import raises ImportError).
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(PreflightFailed) as e:
        require(cfg, ["sft"], tmp_path / "run")
    msg = str(e.value)
    assert "tracker wandb: training.report_to lists wandb, whose package is not installed" in msg
    assert "fix: pip install wandb, or remove wandb from training.report_to" in msg
    assert "tracker tensorboard" not in msg  # installed
    # Stages that do not train report nowhere: nothing to check.
    assert not [c for c in require(cfg, ["report"], tmp_path / "run") if c.name.startswith("tracker")]


def test_preflight_says_what_mlflows_local_store_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from tunepipe.preflight import tracker_checks

    cfg = load_config(None, ["training.report_to=mlflow"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "alembic", None)  # simulates mlflow-skinny without alembic
    (check,) = tracker_checks(cfg, ["sft"])
    assert (
        check.blocking and "needs alembic" in check.detail and "pip install sqlalchemy alembic" in check.fix
    )
    # With a server to report to, the local store is not used.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracker_checks(cfg, ["sft"]) == []


@pytest.mark.parametrize(
    ("name", "install"),
    [
        ("comet_ml", "pip install comet-ml"),
        ("azure_ml", "pip install azureml-core"),
        ("tensorboard", "pip install tensorboard"),
    ],
)
def test_tracker_install_commands_name_the_pip_package(
    name: str, install: str, monkeypatch: pytest.MonkeyPatch
):
    from tunepipe.preflight import tracker_checks

    for group in trackers.TRACKERS[name].needs:
        for module in group:
            monkeypatch.setitem(sys.modules, module, None)  # simulates the package's absence
    cfg = load_config(None, [f"training.report_to={name}"])
    (check,) = tracker_checks(cfg, ["sft"])
    assert check.name == f"tracker {name}" and check.fix.startswith(f"{install}, or remove {name}")


def test_tensorboard_is_on_with_tensorboardx_alone(monkeypatch: pytest.MonkeyPatch):
    from tunepipe.preflight import tracker_checks

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # simulates tensorboard's absence
    monkeypatch.setitem(sys.modules, "tensorboardX", types.ModuleType("tensorboardX"))
    monkeypatch.setattr(
        sys.modules["tensorboardX"], "__spec__", importlib.machinery.ModuleSpec("tensorboardX", None)
    )
    assert tracker_checks(load_config(None, ["training.report_to=tensorboard"]), ["sft"]) == []


# --------------------------------------------------------------------------- run names and defaults


def test_env_defaults_point_every_tracker_at_the_run_folder_unless_the_user_set_them(tmp_path: Path):
    cfg = load_config(None, ["project.name=proj", "training.report_to=[tensorboard, wandb, mlflow, trackio]"])
    run = tmp_path / "run"
    assert trackers.env_defaults(cfg, "dpo", run, environ={}) == {
        "TENSORBOARD_LOGGING_DIR": str(run / "dpo" / "tensorboard"),
        "WANDB_PROJECT": "proj",
        "WANDB_DIR": str(run),
        "MLFLOW_EXPERIMENT_NAME": "proj",
        "MLFLOW_TRACKING_URI": f"sqlite:///{run.as_posix()}/mlruns/mlflow.db",
        "TRACKIO_DIR": str(run / "trackio"),
    }
    mine = {"WANDB_PROJECT": "team", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "WANDB_DIR": "/scratch"}
    kept = trackers.env_defaults(cfg, "dpo", run, environ=mine)
    assert not set(mine) & set(kept) and "MLFLOW_EXPERIMENT_NAME" in kept
    # Only the trackers that are on get defaults.
    only_tb = load_config(None, ["training.report_to=tensorboard"])
    assert set(trackers.env_defaults(only_tb, "sft", run, environ={})) == {"TENSORBOARD_LOGGING_DIR"}
    assert trackers.trainer_kwargs(cfg, "dpo")["run_name"] == "proj/dpo"


def test_where_each_tracker_writes_hides_the_password_of_a_tracking_uri(monkeypatch: pytest.MonkeyPatch):
    cfg = load_config(None, ["project.name=proj", "training.report_to=mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:s3cret-pass@mlflow.example")
    where = trackers.destinations(cfg, "sft", Path("/run"))
    assert where == {"mlflow": "experiment proj at https://***@mlflow.example"}


def test_the_defaults_hold_while_the_stage_trains_and_are_removed_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cfg = load_config(None, ["training.report_to=[tensorboard]"])
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    lines: list[str] = []
    with trackers.reporting(cfg, "sft", tmp_path, lines.append):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "sft" / "tensorboard")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    assert lines == [f"sft: reporting to tensorboard ({tmp_path / 'sft' / 'tensorboard'})"]
    with pytest.raises(RuntimeError), trackers.reporting(cfg, "sft", tmp_path, lines.append):
        raise RuntimeError("a failing stage")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ


def test_mlflow_params_are_dotted_prefixed_and_cut_to_mlflows_limit():
    resolved = {"a": {"b": 1, "c": None}, "l": [{"x": "y" * 20}], "s": ["sft", "kto"], "e": []}
    assert trackers.mlflow_params(resolved, 10) == {
        "tunepipe.a.b": "1",
        "tunepipe.a.c": "null",
        "tunepipe.l.0.x": "y" * 10,
        "tunepipe.s": '["sft", "k',  # JSON, cut too
        "tunepipe.e": "[]",
    }


# --------------------------------------------------------------------------- one real run

CANARIES = {
    "WANDB_API_KEY": "0123456789abcdef" * 2 + "fedcba98",  # 40 characters, as W&B keys are
    "HF_TOKEN": "hf_" + "Zq7" * 10,
    "MLFLOW_TRACKING_PASSWORD": "mlflow-canary-Pa55w0rd-4242",
    "COMET_API_KEY": "comet-canary-0f0f0f0f0f0f0f",
}


def _wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB blocks of
    chunks with a 7-byte header each: CRC32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, buf = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


@pytest.mark.slow
def test_one_sft_run_reports_to_tensorboard_wandb_and_mlflow_without_leaking_secrets(
    tmp_path: Path, tiny_qwen3: Path
):
    cfg_path = write_config(
        tmp_path,
        tiny_qwen3,
        project={"name": "trk", "output_dir": "runs/trk"},
        training={"report_to": ["tensorboard", "wandb", "mlflow"], "logging_steps": 1},
    )
    run = tmp_path / "runs" / "trk"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TENSORBOARD_"))}
    home = tmp_path / "home"  # W&B's settings and caches: not the user's
    env.update(
        CANARIES,
        HF_HUB_OFFLINE="1",
        NO_COLOR="1",
        WANDB_MODE="offline",
        WANDB_CONFIG_DIR=str(home / "config"),
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_DATA_DIR=str(home / "data"),
    )
    # One process for data + sft (W&B and MLflow keep global state per process).
    script = (
        "import sys\n"
        "from tunepipe.config import load_config\n"
        "from tunepipe.pipeline import run_pipeline\n"
        "run_pipeline(load_config(sys.argv[1], ['pipeline=[sft]']), stages=['data', 'sft'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(cfg_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sft: reporting to tensorboard" in proc.stdout
    logged = [r for r in map(json.loads, (run / "sft" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    steps, losses = [r["step"] for r in logged], [r["loss"] for r in logged]
    assert steps == [1, 2, 3, 4]
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())

    # TensorBoard: event files under <run>/sft/tensorboard with every logged loss, and the config text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "sft" / "tensorboard"))
    tb.Reload()
    points = tb.Scalars("train/loss")
    assert [p.step for p in points] == steps
    assert [p.value for p in points] == pytest.approx(losses, rel=1e-6)  # stored as float32
    (text,) = tb.Tensors("tunepipe/config/text_summary")
    assert "report_to:" in text.tensor_proto.string_val[0].decode()

    # W&B offline: <run>/wandb/offline-run-*/ with the run name, the config and the loss history.
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = _wandb_records(wandb_file)
    (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run_rec.display_name, run_rec.project) == ("trk/sft", "trk")
    config = {
        u.key: json.loads(u.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for u in r.config.update
    }
    assert config["tunepipe"] == resolved
    history = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    history = [h for h in history if "train/loss" in h]
    assert [h["train/global_step"] for h in history] == steps
    assert [h["train/loss"] for h in history] == pytest.approx(losses)

    # MLflow: the local store <run>/mlruns/mlflow.db, experiment = project, run = project/stage.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.as_posix()}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("trk")
    assert experiment.artifact_location == (run / "mlruns" / "artifacts").resolve().as_uri()
    (ml_run,) = client.search_runs([experiment.experiment_id])
    assert (ml_run.info.run_name, ml_run.info.status) == ("trk/sft", "FINISHED")
    loss_history = client.get_metric_history(ml_run.info.run_id, "loss")
    assert [m.step for m in loss_history] == steps
    assert [m.value for m in loss_history] == pytest.approx(losses)
    params = ml_run.data.params
    assert params["tunepipe.project.name"] == "trk"
    assert params["tunepipe.training.report_to"] == '["tensorboard", "wandb", "mlflow"]'
    assert params["tunepipe.sft.learning_rate"] == str(resolved["sft"]["learning_rate"])
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "wandb").exists()  # nothing in the cwd

    # No secret anywhere in the run folder, binary files included.
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        for name, secret in CANARIES.items():
            assert secret.encode() not in data, f"{name} in {path.relative_to(run)}"
