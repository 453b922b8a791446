"""The stage registry: a stage defined here, outside tunepipe, runs through `run`, eval, the report and
the CLI without editing any tunepipe module.

This test module is itself the plugin: the config lists it under `plugins:`, and the `tunepipe`
subprocesses find it on PYTHONPATH. Its stage `toy` trains TRL's SFTTrainer on conversations with
its own config section (one key of its own), through the shared run_trainer_stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tunepipe, write_config
from pydantic import Field

from tunepipe.config import ConfigError, StageTrainingConfig, load_config
from tunepipe.stages import StageContext, StageResult, registry
from tunepipe.stages.registry import Curve, TrainingStage


class ToySection(StageTrainingConfig):
    """`toy:` a stage of our own."""

    per_device_train_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    rows: int = Field(8, ge=1)  # its own setting: how many conversations it trains on


STAGE = TrainingStage(
    name="toy",
    module=__name__,
    section=ToySection,
    data="conversations",
    title="Toy",
    summary="a stage defined outside tunepipe",
    trainer="trl:SFTTrainer",
    trainer_config="trl:SFTConfig",
    curves=(Curve("grad_norm", "toy grad norm"),),
)


def run(ctx: StageContext) -> StageResult:
    from datasets import Dataset

    from tunepipe.data.prepare import read_split
    from tunepipe.training import run_trainer_stage

    rows = read_split(ctx.data_dir, "toy_train")[: ctx.cfg.stage("toy").rows]
    train = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    return run_trainer_stage(ctx, "toy", train, f"{len(rows)} toy conversations", outputs={"rows": len(rows)})


@pytest.fixture
def toy_registered() -> Any:
    registry.register(STAGE)
    yield STAGE
    registry.unregister("toy")


def test_a_registered_stage_gets_its_config_section_data_block_and_eval_model(toy_registered: Any) -> None:
    cfg = load_config(None, ["pipeline=[sft,toy]", "toy.rows=3", "data.toy.train=x.jsonl"])
    assert cfg.stage("toy").rows == 3 and cfg.data.toy.train[0].path == "x.jsonl"
    assert cfg.eval.models == ["base", "sft", "toy"]
    assert [s.source for s in cfg.eval.sets] == ["sft_eval", "toy_eval"]
    assert registry.previous(cfg, "toy") == "sft" and registry.chain(cfg, "toy") == ["sft", "toy"]
    assert "toy" in cfg.hardware.time_shares
    with pytest.raises(ConfigError, match=r"unknown key 'toy.rowz' did you mean 'toy.rows'"):
        load_config(None, ["toy.rowz=1"])


def test_pipeline_names_unknown_and_repeated_stages() -> None:
    with pytest.raises(ConfigError, match=r"unknown training stage 'dop'; did you mean 'dpo'"):
        load_config(None, ["pipeline=[sft,dop]"])
    with pytest.raises(ConfigError, match="repeated: sft"):
        load_config(None, ["pipeline=[sft,sft]"])
    with pytest.raises(ConfigError, match="eval.models lists 'dpo' but pipeline does not list 'dpo'"):
        load_config(None, ["pipeline=[sft]", "eval.models=[base,dpo]"])
    # Evaluated (and tabulated) in pipeline order, whatever the order written.
    assert load_config(None, ["eval.models=[dpo,base]"]).eval.models == ["base", "dpo"]


def test_a_plugin_that_is_not_a_stage_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "notastage.py").write_text("X = 1\n")
    cfg = tmp_path / "tunepipe.yaml"
    cfg.write_text(yaml.safe_dump({"plugins": ["notastage"]}))
    with pytest.raises(ConfigError, match="'notastage' defines no STAGE"):
        load_config(cfg)
    cfg.write_text(yaml.safe_dump({"plugins": ["missing_module"]}))
    with pytest.raises(ConfigError, match="plugin: cannot import module 'missing_module'"):
        load_config(cfg)


@pytest.mark.slow
def test_a_stage_from_outside_runs_through_run_eval_report_and_the_cli(
    tmp_path: Path, tiny_qwen3: Path
) -> None:
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        data={"toy": {"train": "data/skills_sft_train.jsonl", "eval": "data/skills_sft_eval.jsonl"}},
        toy={"max_steps": 3, "learning_rate": 1e-2, "rows": 6, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    )
    raw = yaml.safe_load(cfg.read_text())
    # Three stages: the toy one starts from DPO's result, itself made from SFT's (adapters chained).
    raw["pipeline"], raw["plugins"] = ["sft", "dpo", "toy"], [__name__]
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    here = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}

    first = tunepipe("run", cfg, "--smoke", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for s in ("data", "sft", "dpo", "toy", "eval", "report"):
        assert f"[{s}] running" in first.stdout
    assert "toy: starts from the DPO result" in first.stdout
    run_dir = tmp_path / "runs" / "test-smoke"
    done = json.loads((run_dir / "toy" / "stage.json").read_text())
    assert (
        done["status"] == "done" and done["outputs"]["rows"] == 6 and done["outputs"]["starts_from"] == "dpo"
    )
    assert (run_dir / "toy" / "adapter" / "adapter_config.json").is_file()
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert list(metrics) == ["base", "sft", "dpo", "toy"] and "toy_eval" in metrics["toy"]
    report = (run_dir / "report" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| set | metric"))
    assert "| base | sft | dpo | toy |" in header and "Δ toy−dpo" in header
    assert "toy_curves.png" in report and (run_dir / "report" / "toy_curves.png").is_file()
    assert "**toy**" in report

    # The CLI's stage choices come from the registry too: train it alone, chat with it.
    again = tunepipe("train", cfg, "--stage", "toy", "--smoke", env=env)
    assert again.returncode == 0 and "[toy] running" in again.stdout, again.stderr[-2000:]
    chat = tunepipe("chat", cfg, "--stage", "toy", "--smoke", "-p", "hi", env=env)
    assert chat.returncode == 0, chat.stderr[-2000:]
    wrong = tunepipe("train", cfg, "--stage", "kto", "--smoke", env=env)
    assert wrong.returncode == 2 and "not in this config's pipeline (sft, dpo, toy)" in wrong.stderr
