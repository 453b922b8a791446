"""Training methods and DPO reference policies, each through a real --smoke run of the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tunepipe, write_config

pytestmark = pytest.mark.slow


def _run(cfg: Path, *overrides: str):
    return tunepipe("run", cfg, "--smoke", *overrides)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_full_fine_tuning_saves_whole_models_and_dpo_uses_a_frozen_copy(tmp_path: Path, tiny_qwen3: Path):
    cfg = write_config(tmp_path, tiny_qwen3)
    r = _run(cfg, "sft.method=full", "dpo.method=full")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "test-smoke"
    base, sft, dpo = _weights(tiny_qwen3), _weights(run / "sft" / "model"), _weights(run / "dpo" / "model")
    assert not (run / "sft" / "adapter").exists()
    key = "model.layers.0.mlp.down_proj.weight"
    assert not (base[key] == sft[key]).all() and not (sft[key] == dpo[key]).all()
    assert json.loads((run / "dpo" / "stage.json").read_text())["outputs"]["reference"] == "copy"
    assert set(json.loads((run / "eval" / "metrics.json").read_text())) == {"base", "sft", "dpo"}


def test_freeze_trains_only_the_last_layers(tmp_path: Path, tiny_qwen3: Path):
    cfg = write_config(tmp_path, tiny_qwen3)
    r = _run(
        cfg,
        "sft.method=freeze",
        "sft.freeze_trainable_layers=1",
        "dpo.enabled=false",
        "eval.models=[base, sft]",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    base, sft = _weights(tiny_qwen3), _weights(tmp_path / "runs" / "test-smoke" / "sft" / "model")
    changed = {k for k in base if not (base[k] == sft[k]).all()}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm")) for k in changed)


@pytest.mark.parametrize("reference", ["precompute", "copy"])
def test_dpo_reference_policies_with_lora(tmp_path: Path, tiny_qwen3: Path, reference: str):
    cfg = write_config(tmp_path, tiny_qwen3)
    r = _run(cfg, f"dpo.reference={reference}", "dpo.label_smoothing=0.1", "dpo.loss_type=robust")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads((tmp_path / "runs" / "test-smoke" / "dpo" / "stage.json").read_text())["outputs"]
    assert out["reference"] == reference and out["result"] == "dpo/adapter"


def test_adapter_reference_needs_lora(tmp_path: Path, tiny_qwen3: Path):
    cfg = write_config(tmp_path, tiny_qwen3)
    r = _run(cfg, "dpo.method=full", "dpo.reference=adapter")
    assert r.returncode == 2 and "dpo.reference: adapter needs a LoRA method" in r.stderr
