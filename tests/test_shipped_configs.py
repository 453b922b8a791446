"""The accelerate and DeepSpeed configs we ship parse with the installed accelerate and agree with
their names and with each other (CI has no GPU to launch them)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT

ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerate(path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    text = path.read_text()
    assert text.startswith("#") and "accelerate launch --config_file" in text  # opens with its command
    if m := re.match(r"ddp-(\d)gpu", path.stem):
        assert cfg.num_processes == int(m.group(1))
        assert str(cfg.distributed_type).endswith("NO" if m.group(1) == "1" else "MULTI_GPU")
    if path.stem.startswith("zero"):
        ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == int(path.stem[-1])
        assert cfg.deepspeed_config["zero3_init_flag"] is (path.stem == "zero3")


def test_deepspeed_configs_defer_batch_and_precision_to_the_trainer() -> None:
    for f in (ROOT / "configs" / "deepspeed").glob("*.json"):
        ds = json.loads(f.read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert ds[key] == "auto", (f.name, key)
