"""The whole pipeline through the real CLI, in subprocesses, on tiny random models (no hub).

A --smoke run trains SFT and DPO for a few real steps with TRL, evaluates and reports; a second run
skips every stage; changing sft.learning_rate reruns sft, dpo, eval and report but not data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tunepipe, write_config

pytestmark = pytest.mark.slow

STAGES = ["data", "sft", "dpo", "eval", "report"]


def _lora_tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def _ran(out: str) -> list[str]:
    return [s for s in STAGES if f"[{s}] running" in out]


def _skipped(out: str) -> list[str]:
    return [s for s in STAGES if f"[{s}] skipped (up to date)" in out]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_smoke_run_trains_writes_the_run_folder_and_skips_when_up_to_date(
    tmp_path: Path, arch: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(f"tiny_{arch}")
    cfg = write_config(tmp_path, model)
    first = tunepipe("run", cfg, "--smoke")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _ran(first.stdout) == STAGES

    run = tmp_path / "runs" / "test-smoke"
    for rel in [
        "pipeline.json",
        "config.resolved.yaml",
        "env.json",
        "data/stats.json",
        "data/rejects.jsonl",
        "data/sft_train.jsonl",
        "data/dpo_train.jsonl",
        "sft/adapter/adapter_config.json",
        "sft/log.jsonl",
        "sft/stage.json",
        "dpo/adapter/adapter_config.json",
        "dpo/log.jsonl",
        "dpo/stage.json",
        "eval/metrics.json",
        "eval/stage.json",
        "report/report.md",
        "report/report.html",
        "report/sft_curves.png",
        "report/dpo_curves.png",
        "report/lengths.png",
        "logs/sft.log",
    ]:
        assert (run / rel).is_file(), rel
    assert list((run / "eval" / "samples").glob("*.jsonl"))

    # LoRA B matrices start at zero: non-zero values mean the optimiser changed the parameters.
    for stage in ("sft", "dpo"):
        tensors = _lora_tensors(run / stage / "adapter")
        b = [t for k, t in tensors.items() if "lora_B" in k]
        assert b and all(t.abs().sum() > 0 for t in b), stage
        log = [json.loads(x) for x in (run / stage / "log.jsonl").read_text().splitlines()]
        assert len(log) >= 2 and all("step" in r and "loss" in r for r in log)
        assert json.loads((run / stage / "stage.json").read_text())["status"] == "done"
        assert f"{stage}: LM head projects only the loss-bearing positions" in first.stdout
    # The DPO adapter is new and trained on top of the merged SFT weights, so the two differ.
    sft_b, dpo_b = _lora_tensors(run / "sft" / "adapter"), _lora_tensors(run / "dpo" / "adapter")
    k = next(k for k in sft_b if "lora_B" in k)
    assert not (sft_b[k] == dpo_b[k]).all()

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"base", "sft", "dpo"}
    for m in metrics.values():
        assert {"exact_match", "loss"} <= set(m["sft_eval"]) and "preference_accuracy" in m["dpo_eval"]
    assert metrics["sft"]["sft_eval"]["loss"] != metrics["base"]["sft_eval"]["loss"]
    report = (run / "report" / "report.md").read_text()
    assert "exact_match" in report and "sft_curves.png" in report

    second = tunepipe("run", cfg, "--smoke")
    assert second.returncode == 0 and _ran(second.stdout) == [] and _skipped(second.stdout) == STAGES
    state = json.loads((run / "pipeline.json").read_text())
    assert all(state["stages"][s]["status"] == "done" for s in STAGES)

    if arch != "qwen3":
        return
    _export_equals_adapter_model(cfg, run, tmp_path / "exported")
    changed = tunepipe(
        "run", cfg, "--smoke", "sft.learning_rate=5e-3", "sft.lm_head_loss_positions_only=false"
    )
    assert changed.returncode == 0, changed.stdout[-3000:]
    assert "sft: LM head projects" not in changed.stdout and "dpo: LM head projects" in changed.stdout
    assert _skipped(changed.stdout) == ["data"] and _ran(changed.stdout) == ["sft", "dpo", "eval", "report"]
    new_b = _lora_tensors(run / "sft" / "adapter")
    assert not (new_b[k] == sft_b[k]).all()


def test_single_stage_commands_and_missing_upstream(tmp_path: Path, tiny_qwen3: Path) -> None:
    cfg = write_config(tmp_path, tiny_qwen3)
    early = tunepipe("train", cfg, "--stage", "dpo", "--smoke")
    assert early.returncode != 0
    assert "needs stage 'data'" in early.stdout + early.stderr
    data = tunepipe("data", cfg, "--smoke", "--preview", "2")
    assert data.returncode == 0 and _ran(data.stdout) == ["data"]
    # Not a terminal: trained tokens are marked [[...]], each example with its token counts.
    blocks = [b for b in data.stdout.split("--- ")[1:] if "tokens," in b]
    assert [b.split(":")[0] for b in blocks] == [
        "sft_train #1",
        "sft_train #2",
        "dpo_train #1 (chosen)",
        "dpo_train #1 (rejected)",
        "dpo_train #2 (chosen)",
        "dpo_train #2 (rejected)",
    ]
    first = blocks[0]
    assert first.count("[[") == 1 and "<|im_end|>]]" in first and "<|im_start|>user" in first
    assert "[[" not in first.split("<|im_start|>assistant")[0]  # nothing before the reply is trained
    stats = json.loads((tmp_path / "runs" / "test-smoke" / "data" / "stats.json").read_text())
    assert stats["rejected"] == 0 and stats["splits"]["sft_train"]["rows"] > 0


def _export_equals_adapter_model(cfg: Path, run: Path, out: Path) -> None:
    """The exported folder loads with plain transformers and generates what the adapters generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe.config import load_config
    from tunepipe.evaluation import generate
    from tunepipe.modeling import load_stage_model, plan_for

    r = tunepipe("export", cfg, "--smoke", "--stage", "dpo", "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    c = load_config(cfg)
    adapters = load_stage_model(c, plan_for(c.model), run, "dpo", log=lambda _m: None).eval()
    questions = [
        "What is 12 + 30?",
        "Sort in ascending order: 9, 2, 5",
        "Convert 3 kg to grams.",
        "Write 'red fox' in capital letters.",
        "Reverse the order of these words: a b c",
    ]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    assert generate(exported, tok, prompts, 8, 5) == generate(adapters, tok, prompts, 8, 5)


# [sft, grpo]: GRPO from the SFT model (a three-stage chain is test_registry's toy stage's).
@pytest.mark.parametrize("order", [["sft", "grpo"]])
def test_pipeline_order_with_grpo_runs_end_to_end(tmp_path: Path, tiny_qwen3: Path, order: list[str]) -> None:
    """`pipeline:` sets the stages: each starts from the one before, eval has one column per trained
    stage and the report one curve panel per stage."""
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        # Prompts with answers from the SFT conversations (their last assistant turn).
        data={"grpo": {"train": "data/skills_sft_train.jsonl", "eval": "data/skills_sft_eval.jsonl"}},
        grpo={
            "max_steps": 2,
            "learning_rate": 1e-3,
            "num_generations": 2,
            "max_completion_length": 6,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "rewards": [{"name": "rouge_l"}, {"name": "length", "target": 8, "weight": 0.5}],
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        },
    )
    first = tunepipe("run", cfg, "--smoke", f"pipeline=[{','.join(order)}]")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    names = ["data", *order, "eval", "report"]
    every = ["data", "sft", "dpo", "grpo", "eval", "report"]
    assert [s for s in every if f"[{s}] running" in first.stdout] == [s for s in every if s in names]
    run = tmp_path / "runs" / "test-smoke"
    grpo = json.loads((run / "grpo" / "stage.json").read_text())
    assert grpo["status"] == "done" and grpo["outputs"]["starts_from"] == order[-2]
    log = [json.loads(x) for x in (run / "grpo" / "log.jsonl").read_text().splitlines()]
    assert log and all("reward" in r for r in log)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert list(metrics) == ["base", *order]
    report = (run / "report" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| set | metric"))
    assert header.startswith("| set | metric | " + " | ".join(["base", *order]) + " |")
    for stage in order:
        assert (run / "report" / f"{stage}_curves.png").is_file() and f"{stage}_curves.png" in report
    second = tunepipe("run", cfg, "--smoke", f"pipeline=[{','.join(order)}]")
    assert second.returncode == 0 and all(f"[{s}] skipped (up to date)" in second.stdout for s in names)
