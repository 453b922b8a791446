"""The memory and time planner: formulas on known shapes, and the CPU estimate against the peak RSS of
real training runs (tiny model and the embedded SmolLM2-135M)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunepipe.config import Config, load_config
from tunepipe.planner import (
    GiB,
    ModelShape,
    PlannerError,
    compare_sharding,
    estimate_memory,
    estimate_time,
    starting_batch,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "qwen3-4b-sft-dpo.yaml"


def example(*overrides: str) -> Config:
    return load_config(EXAMPLE, list(overrides))


# --------------------------------------------------------------------------- formulas


def test_qwen3_4b_shape_and_parameter_count() -> None:
    shape = ModelShape.from_config(example())
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (2560, 36, 151936)
    assert abs(shape.n_params - 4.02e9) / 4.02e9 < 0.02


def test_qwen3_4b_qlora_per_h100_is_plausible() -> None:
    sft = estimate_memory(example(), "sft")
    assert sft.device == "cuda" and "H100" in sft.device_label
    # NF4 linear layers (~1.9 GB) plus the 16-bit tied embedding (~0.8 GB)
    assert 2.5e9 <= sft.weights <= 3.0e9
    assert 25e6 < sft.trainable_params < 40e6  # r=16 on all seven linear modules of 36 layers
    assert sft.gradient_checkpointing and sft.fits(80)
    dpo = estimate_memory(example(), "dpo")
    # auto checkpointing: 2 x 4096 tokens do not fit 80 GB without it, so the plan turns it on.
    assert dpo.batch == 1 and dpo.gradient_checkpointing
    assert not estimate_memory(example(), "dpo", checkpointing=False).fits(80)
    assert dpo.reference == 0  # the reference is the policy with its adapter disabled
    rows = dict((name, gib) for name, gib, _ in dpo.table())
    assert float(rows["total"]) == pytest.approx(dpo.total_bytes / GiB, abs=0.01)


def test_doubling_the_batch_doubles_activations() -> None:
    cfg = example()
    one, two = estimate_memory(cfg, "sft", batch=1), estimate_memory(cfg, "sft", batch=2)
    assert two.activations == pytest.approx(2 * one.activations, rel=1e-6)
    assert two.total_bytes > one.total_bytes and two.weights == one.weights


def test_gradient_checkpointing_lowers_activations() -> None:
    on = estimate_memory(example("dpo.gradient_checkpointing=true"), "dpo")
    off = estimate_memory(example("dpo.gradient_checkpointing=false"), "dpo")
    assert on.activations < off.activations / 5
    assert on.activations == off.activations_with_checkpointing


def test_dpo_counts_chosen_and_rejected_and_a_reference_copy() -> None:
    cfg = example("dpo.per_device_train_batch_size=2", "dpo.gradient_checkpointing=true")
    sft, dpo = estimate_memory(cfg, "sft"), estimate_memory(cfg, "dpo")
    assert dpo.activations == pytest.approx(2 * sft.activations, rel=1e-6)  # 2 sequences per example
    full = load_config(
        None,
        ["hardware.gpus=1", "model.name_or_path=Qwen/Qwen3-0.6B", "dpo.method=full", "dpo.reference=copy"],
    )
    assert estimate_memory(full, "dpo").reference == estimate_memory(full, "dpo").weights


def test_zero3_divides_weights_gradients_and_optimizer_by_world_size(tmp_path: Path) -> None:
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    common = ["model.name_or_path=Qwen/Qwen3-8B", "sft.method=full", "hardware.gpus=4"]
    ddp = estimate_memory(load_config(None, common), "sft")
    z3 = estimate_memory(load_config(None, [*common, f"hardware.deepspeed={ds}"]), "sft")
    assert z3.zero_stage == 3 and z3.world_size == 4
    for part in ("weights", "gradients"):
        assert getattr(z3, part) == pytest.approx(getattr(ddp, part) / 4, rel=1e-6)
    # DeepSpeed's bf16 optimizer: fp32 master weights + two fp32 AdamW states = 12 B per parameter, / 4.
    assert z3.optimizer == pytest.approx(12 * z3.shape.n_params / 4, rel=1e-6)
    assert z3.activations == ddp.activations  # activations are per process


def test_each_sharding_choice_per_process_at_world_4() -> None:
    cfg = load_config(None, ["model.name_or_path=Qwen/Qwen3-8B", "sft.method=full", "hardware.gpus=4"])
    by = compare_sharding(cfg, "sft")
    assert list(by) == ["ddp", "fsdp", "zero2", "zero3"] and by["ddp"].sharding == "ddp"
    state = {k: e.model_state_bytes for k, e in by.items()}
    assert state["zero3"] < state["zero2"] < state["ddp"]
    n = by["ddp"].shape.n_params
    # ZeRO's 2 + 2 + 12 B per parameter: 16 / 4 with ZeRO-3, 2 + 14 / 4 with ZeRO-2; FSDP2's fp32
    # master weights, fp32 gradients and AdamW states are 16 B too, all sharded.
    assert state["zero3"] == pytest.approx(16 * n / 4, rel=1e-3)
    assert state["zero2"] == pytest.approx((2 + 14 / 4) * n, rel=1e-3)
    assert state["fsdp"] == pytest.approx(state["zero3"], rel=1e-3)
    assert state["ddp"] == pytest.approx(8 * n, rel=1e-3)  # bf16 weights, gradients, two AdamW states
    # Gathered parameters only where weights are sharded; DDP's buckets copy the gradients.
    assert by["fsdp"].gathered > 0 and by["zero3"].gathered > 0 and by["zero2"].gathered == 0
    assert by["ddp"].buffers == by["ddp"].gradients and by["fsdp"].buffers == 0
    assert len({e.activations for e in by.values()}) == 1  # activations are per process everywhere
    # The model state shrinks with the world size only where it is sharded.
    eight = compare_sharding(
        load_config(None, ["model.name_or_path=Qwen/Qwen3-8B", "sft.method=full", "hardware.gpus=8"]), "sft"
    )
    assert eight["ddp"].model_state_bytes == state["ddp"]
    assert eight["zero3"].model_state_bytes == pytest.approx(state["zero3"] / 2, rel=1e-3)


def test_lora_sharding_divides_the_frozen_base_only_with_fsdp_and_zero3() -> None:
    cfg = load_config(
        None, ["model.name_or_path=Qwen/Qwen3-8B", "hardware.gpus=4", "hardware.sharding=zero3"]
    )
    by = compare_sharding(cfg, "sft")
    assert by["zero3"].weights == pytest.approx(by["ddp"].weights / 4, rel=1e-3)
    assert by["fsdp"].weights == pytest.approx(by["ddp"].weights / 4, rel=1e-3)
    assert by["zero2"].weights == by["ddp"].weights  # a whole copy of the frozen base per GPU
    assert estimate_memory(cfg, "sft").total_bytes == by["zero3"].total_bytes  # the configured one


def test_cpu_processes_are_the_world_size() -> None:
    cfg = load_config(None, ["hardware.processes=2", "hardware.sharding=fsdp"])
    est = estimate_memory(cfg, "sft", device="cpu", shape=ModelShape.from_config(example()))
    ddp = estimate_memory(cfg, "sft", device="cpu", shape=est.shape, shard="ddp")
    assert est.world_size == 2 and est.weights == pytest.approx(ddp.weights / 2, rel=1e-3)


def test_full_finetuning_in_bf16_costs_8_bytes_per_parameter_before_activations() -> None:
    cfg = load_config(None, ["model.name_or_path=Qwen/Qwen3-0.6B", "sft.method=full", "hardware.gpus=1"])
    est = estimate_memory(cfg, "sft")
    per_param = (est.weights + est.gradients + est.optimizer) / est.shape.n_params
    assert per_param == pytest.approx(8, rel=0.01)  # bf16 weights, bf16 grads, two bf16 AdamW states


def test_starting_batch_keeps_batch_times_accumulation() -> None:
    cfg = example("sft.per_device_train_batch_size=8", "sft.gradient_accumulation_steps=2")
    assert starting_batch(cfg, "sft", 1000 * GiB) == (8, 2)
    one = estimate_memory(cfg, "sft", batch=1).total_bytes
    two = estimate_memory(cfg, "sft", batch=2).total_bytes
    batch, accum = starting_batch(cfg, "sft", int((one + two) / 2 / 0.95))
    assert (batch, accum) == (1, 16) and batch * accum == 16
    batch, accum = starting_batch(cfg, "sft", int(two / 0.95) + 1)
    assert (batch, accum) == (2, 8)


def test_unknown_model_that_is_not_available_says_what_to_do() -> None:
    cfg = load_config(None, ["model.name_or_path=someone/unheard-of-7b", "hardware.gpus=1"])
    with pytest.raises(PlannerError, match=r"unheard-of-7b.*config\.json"):
        estimate_memory(cfg, "sft")


def test_time_estimate_follows_steps_tokens_and_budget() -> None:
    cfg = example("sft.max_steps=100")
    t = estimate_time(cfg, "sft", n_examples=None, mean_tokens=1000)
    assert t.steps == 100
    assert t.tokens == 100 * 2 * 8 * 4 * 1000  # steps x batch x accumulation x GPUs x tokens
    assert t.budget_seconds == pytest.approx(24 * 3600 * 0.5)  # sft's share of the 24h
    assert t.seconds is not None and t.fits
    by_epochs = estimate_time(example(), "sft", n_examples=6400, mean_tokens=1000)
    assert by_epochs.steps == 2 * 6400 // (2 * 8 * 4)  # 2 epochs
    no_ckpt = example(
        "sft.max_steps=100",
        "sft.gradient_checkpointing=false",
        "dpo.max_steps=100",
        "dpo.gradient_checkpointing=false",
    )
    sft = estimate_time(no_ckpt, "sft", n_examples=None, mean_tokens=1000)
    dpo = estimate_time(no_ckpt, "dpo", n_examples=None, mean_tokens=1000)
    assert dpo.tokens == 100 * 1 * 16 * 4 * 2 * 1000  # chosen and rejected
    # LoRA: forward + activation gradients (2F per token); DPO adds the reference forward (3F)
    assert dpo.flops / dpo.tokens == pytest.approx(1.5 * sft.flops / sft.tokens)
    unknown = estimate_time(example(), "sft", n_examples=None, mean_tokens=None)
    assert unknown.seconds is None and "unknown" in unknown.summary()


# --------------------------------------------------------------------------- measured on CPU

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "box",
    "jolly",
    "zebras",
]


def _long_data(folder: Path) -> None:
    """Rows longer than max_length, truncated to it: every batch is the planner's worst case."""
    import random

    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"messages": [{"role": "user", "content": text(20)}, {"role": "assistant", "content": text(1200)}]}
        for _ in range(24)
    ]
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _measure(tmp_path: Path, model: Path, batch: int, max_length: int) -> tuple[int, Config]:
    import yaml

    _long_data(tmp_path / "data")
    cfg_path = tmp_path / "tunepipe.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "project": {"output_dir": "runs/m"},
                "model": {"name_or_path": str(model)},
                "data": {
                    "sft": {"train": "data/sft.jsonl"},
                    "max_length": max_length,
                    "truncation": "truncate",
                    "max_bad_rows": 0,
                },
                "training": {"save_steps": None},
                "sft": {
                    "per_device_train_batch_size": batch,
                    "gradient_accumulation_steps": 1,
                    "max_steps": 2,
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                },
                "dpo": {"enabled": False},
                "eval": {"models": ["base", "sft"]},
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-m", "tunepipe", "data", str(cfg_path)], env=env, check=True, capture_output=True
    )
    out = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "planner_measure.py"), str(cfg_path), "sft"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2
    return result["peak_rss_bytes"], load_config(cfg_path)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from tunepipe.quickstart.model import resolve_model_path

    return Path(resolve_model_path("smollm2-135m-instruct", log=lambda _m: None))


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_cpu_estimate_matches_peak_rss_of_smollm2_training(tmp_path: Path, smollm2: Path, batch: int) -> None:
    measured, cfg = _measure(tmp_path, smollm2, batch, max_length=256)
    est = estimate_memory(cfg, "sft", device="cpu")
    print(
        f"SmolLM2-135M batch {batch}: measured {measured / GiB:.2f} GiB, "
        f"estimated {est.total_bytes / GiB:.2f}"
    )
    assert est.total_bytes == pytest.approx(measured, rel=0.20)


@pytest.mark.slow
def test_cpu_estimate_matches_peak_rss_of_tiny_model_training(tmp_path: Path, tiny_qwen3: Path) -> None:
    measured, cfg = _measure(tmp_path, tiny_qwen3, 4, max_length=128)
    est = estimate_memory(cfg, "sft", device="cpu")
    print(f"tiny qwen3 batch 4: measured {measured / GiB:.2f} GiB, estimated {est.total_bytes / GiB:.2f}")
    assert est.total_bytes == pytest.approx(measured, rel=0.20)
