"""Shared fixtures. Tests never touch the network: the hub is switched off before anything imports it."""

from __future__ import annotations

import os
import subprocess
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Model imports and the data cache go to a per-session folder, never the user's cache.
os.environ["TUNEPIPE_HOME"] = tempfile.mkdtemp(prefix="tunepipe-home-")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", "qwen3")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_qwen3: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


# A secret in the shape of a Hugging Face token, put in the shared smoke run's goal and environment:
# every file the run, its exports and its cards write must show it masked.
RUN_SECRET = "hf_" + "Ca9nary7Tok3n" * 3


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3: Path) -> tuple[Path, Path]:
    """One finished `run --smoke` (tiny Qwen3, SFT then DPO, eval) shared by the tests that read a
    real run folder (model card, push): (config, run folder). Tests write their exports elsewhere
    or into the run's own export folders, never over what the stages wrote."""
    folder = tmp_path_factory.mktemp("smoke-run")
    cfg = write_config(folder, tiny_qwen3, project={"goal": f"teach skills (token {RUN_SECRET})"})
    res = tunepipe("run", cfg, "--smoke", env={"HF_TOKEN": RUN_SECRET})
    assert res.returncode == 0, res.stderr[-3000:]
    return cfg, folder / "runs" / "test-smoke"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def skills_data(folder: Path, seed: int = 0) -> Path:
    """Small quickstart-style data files in `folder`."""
    from tunepipe.quickstart.skills import write_skills_data

    write_skills_data(folder, seed, n_sft_train=24, n_sft_eval=6, n_dpo_train=12, n_dpo_eval=6)
    return folder


def write_config(folder: Path, model: Path, **sections: dict) -> Path:
    """A pipeline config for a tiny model over the small skills data in `folder/data`."""
    skills_data(folder / "data")
    cfg: dict = {
        "project": {"name": "test", "output_dir": "runs/test"},
        "model": {"name_or_path": str(model)},
        "data": {
            "sft": {"train": "data/skills_sft_train.jsonl", "eval": "data/skills_sft_eval.jsonl"},
            "dpo": {"train": "data/skills_dpo_train.jsonl", "eval": "data/skills_dpo_eval.jsonl"},
            "max_length": 96,
            "max_bad_rows": 0,
        },
        "sft": {
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_steps": 4,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        },
        "dpo": {
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_steps": 4,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        },
        "eval": {"max_new_tokens": 8, "batch_size": 4},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = folder / "tunepipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tunepipe(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `tunepipe` command in a subprocess, offline, with plain output."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tunepipe", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=900,
    )
