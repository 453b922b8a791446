from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from tunepipe.config import ConfigError, load_config, redact

# examples/tasks/ holds lm-evaluation-harness task definitions, not tunepipe configs.
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml") if "tasks" not in p.parts)


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "qwen3-4b-sft-dpo.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.hardware.time_limit_s and cfg.hardware.time_limit_s > 0
    for stage in cfg.pipeline:
        for src in getattr(cfg.data, stage).train:
            p = cfg.path(src.path)
            # Paths are relative to the config file; bundled examples ship their data.
            assert p.exists() or path.name not in ("quickstart.yaml", "grpo.yaml"), p
    for s in cfg.eval.sets:
        if s.source.endswith(".jsonl"):
            assert cfg.path(s.source).is_file(), s.source


def test_quickstart_points_at_bundled_data_and_embedded_model() -> None:
    cfg = load_config(ROOT / "examples" / "quickstart.yaml")
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.output_dir == (ROOT / "runs" / "quickstart").resolve()
    assert cfg.hardware.time_limit == "15m"


def test_qwen3_example_has_the_recommended_settings() -> None:
    cfg = load_config(ROOT / "examples" / "qwen3-4b-sft-dpo.yaml")
    assert cfg.hardware.gpus == 4 and cfg.hardware.time_limit_s == 24 * 3600
    assert cfg.model.load_in_4bit and cfg.sft.method == "qlora" and cfg.dpo.method == "qlora"
    assert cfg.model.attn_implementation == "auto"
    assert cfg.sft.per_device_train_batch_size == 2 and cfg.dpo.per_device_train_batch_size == 1
    assert 8 <= cfg.sft.gradient_accumulation_steps <= 32 and 8 <= cfg.dpo.gradient_accumulation_steps <= 32
    assert cfg.sft.gradient_checkpointing in ("auto", True)
    assert cfg.dpo.gradient_checkpointing in ("auto", False)


def test_defaults_follow_the_field() -> None:
    cfg = load_config(None)
    assert cfg.model.attn_implementation == "auto" and cfg.model.trust_remote_code is False
    assert cfg.sft.per_device_train_batch_size == 2 and cfg.dpo.per_device_train_batch_size == 1
    assert 8 <= cfg.sft.gradient_accumulation_steps <= 32 and 8 <= cfg.dpo.gradient_accumulation_steps <= 32


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "my-run.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_file_and_closest_valid_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "sft:\n  learning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "sft.learning_rat" in msg
    assert "my-run.yaml" in msg
    assert "did you mean 'sft.learning_rate'" in msg


def test_unknown_section_suggests_the_section(tmp_path: Path) -> None:
    path = _write(tmp_path, "trainig:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trainig'.*did you mean 'training'"):
        load_config(path)


def test_bad_value_names_field_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "hardware:\n  time_limit: tomorrow\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "hardware.time_limit" in str(err.value) and "my-run.yaml" in str(err.value)


def test_dotted_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "sft:\n  learning_rate: 1.0e-3\n")
    cfg = load_config(
        path,
        [
            "sft.learning_rate=1e-4",
            "dpo.beta=0.25",
            "sft.lora.r=8",
            "eval.models=[base, sft]",
            "dpo.enabled=false",
        ],
    )
    assert cfg.sft.learning_rate == 1e-4 and cfg.dpo.beta == 0.25 and cfg.sft.lora.r == 8
    assert cfg.eval.models == ["base", "sft"] and cfg.dpo.enabled is False


def test_override_with_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match=r"sft.learning_rte.*did you mean 'sft.learning_rate'"):
        load_config(path, ["sft.learning_rte=1e-4"])


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "project:\n  output_dir: out\ndata:\n  sft:\n    train: d/a.jsonl\n")
    cfg = load_config(path)
    assert cfg.output_dir == tmp_path / "out"
    assert cfg.path(cfg.data.sft.train[0].path) == tmp_path / "d" / "a.jsonl"


def test_secrets_are_redacted() -> None:
    out = redact({"hf_token": "hf_abc", "nested": {"wandb_api_key": "k", "lr": 1}})
    assert "hf_abc" not in str(out) and "'k'" not in str(out) and out["nested"]["lr"] == 1


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = _write(tmp_path, "dpo:\n  betta: 0.2\n")
    r = subprocess.run([sys.executable, "-m", "tunepipe", "run", str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "dpo.betta" in r.stderr and "did you mean 'dpo.beta'" in r.stderr


def test_packing_with_dpo_is_rejected_with_the_reason(tmp_path: Path) -> None:
    path = _write(tmp_path, "dpo:\n  packing: true\n")
    with pytest.raises(ConfigError, match=r"dpo.packing.*not supported for DPO"):
        load_config(path)


def test_qlora_with_zero3_needs_bf16_quant_storage(tmp_path: Path) -> None:
    ds = ROOT / "configs" / "deepspeed"
    qlora = "model: {load_in_4bit: true}\nsft: {method: qlora}\ndpo: {method: qlora}\n"
    path = _write(tmp_path, qlora + f"hardware: {{deepspeed: {ds / 'zero3.json'}}}\n")
    from tunepipe import sharding
    from tunepipe.preflight import PreflightFailed, require

    # Stopped by the preflight of run/train/eval, before anything runs, with the fix.
    with pytest.raises(PreflightFailed, match=r"ZeRO-3 .*bnb_4bit_quant_storage: bfloat16"):
        require(load_config(path), ["sft"], tmp_path / "run")
    assert not sharding.check(load_config(path, ["model.bnb_4bit_quant_storage=bfloat16"]))
    assert not sharding.check(load_config(path, [f"hardware.deepspeed={ds / 'zero2.json'}"]))


def test_a_relative_model_folder_is_read_from_the_configs_folder(tmp_path, monkeypatch) -> None:
    from tunepipe.modeling import model_path

    (tmp_path / "proj" / "models" / "mine").mkdir(parents=True)
    cfg_file = tmp_path / "proj" / "tunepipe.yaml"
    cfg_file.write_text("model: {name_or_path: models/mine}\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = load_config(cfg_file)
    assert model_path(cfg, log=lambda _m: None) == str(tmp_path / "proj" / "models" / "mine")
    hub = load_config(None, ["model.name_or_path=Qwen/Qwen3-4B"])
    assert model_path(hub, log=lambda _m: None) == "Qwen/Qwen3-4B"
