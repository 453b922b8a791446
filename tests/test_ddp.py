"""Two-process DDP on CPU (gloo) for SFT and DPO, launched with `accelerate launch` as on a GPU box."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _launch(cfg: Path, stage: str) -> subprocess.CompletedProcess[str]:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "tunepipe",
        "train",
        str(cfg),
        "--stage",
        stage,
        "--smoke",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_sft_and_dpo_train_in_two_processes(tmp_path: Path, tiny_qwen3: Path) -> None:
    from safetensors.torch import load_file

    cfg = write_config(tmp_path, tiny_qwen3)
    data = subprocess.run(
        [sys.executable, "-m", "tunepipe", "data", str(cfg), "--smoke"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert data.returncode == 0, data.stderr[-2000:]
    run = tmp_path / "runs" / "test-smoke"
    for stage in ("sft", "dpo"):
        r = _launch(cfg, stage)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out = json.loads((run / stage / "stage.json").read_text())
        assert out["status"] == "done" and out["outputs"]["world_size"] == 2
        log = [json.loads(x) for x in (run / stage / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3]  # one writer: no step logged twice
        # 3 steps x micro-batch 2 x 2 processes = 12 rows seen: each process got its own shard.
        rows = {"sft": 16, "dpo": 12}[stage]  # the smoke subset of each training split
        assert log[-1]["epoch"] == pytest.approx(12 / rows, abs=0.01)
        b = [
            t
            for k, t in load_file(str(run / stage / "adapter" / "adapter_model.safetensors")).items()
            if "lora_B" in k
        ]
        assert b and all(t.abs().sum() > 0 for t in b)
    # The second process writes its own log file, never the main one's.
    rank1 = run / "logs" / "sft.rank1.log"
    assert rank1.is_file() and "sft: 16 conversations" in rank1.read_text()
    assert "sft: 16 conversations" in (run / "logs" / "sft.log").read_text()
