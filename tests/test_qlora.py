"""QLoRA on the CPU, for real: bitsandbytes (>= 0.46) runs NF4 `Linear4bit` layers on the CPU, so a
tiny random Qwen3 model loads in 4-bit, trains LoRA adapters for SFT and then DPO, and is evaluated,
through the real CLI. The model is built here with hidden size 64 (bitsandbytes quantizes in blocks
of 64 weights) and 2 layers: 14 linear layers become 4-bit."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tunepipe, write_config

from tunepipe.config import load_config
from tunepipe.modeling import cuda_available, load_kwargs, load_model, plan_for

pytestmark = pytest.mark.slow

QLORA = ["model.load_in_4bit=true", "sft.method=qlora", "dpo.method=qlora"]
# The subprocesses run on the CPU on a GPU machine too; the in-process test needs a machine without one.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
LINEARS = 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers


@pytest.fixture(scope="module")
def tiny_qwen3_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tiny import build_tokenizer
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    dest = tmp_path_factory.mktemp("models") / "tiny-qwen3-64"
    dest.mkdir()
    build_tokenizer(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    Qwen3ForCausalLM(config).save_pretrained(dest)
    return dest


def _log(run: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (run / stage / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.multiproc)])
def test_qlora_sft_dpo_eval_on_cpu(tmp_path: Path, tiny_qwen3_64: Path, processes: int) -> None:
    """One process, and two (each owning its whole 4-bit model, as device_map={"": local_rank} does
    on GPUs: the 4-bit + DDP case), launched by `tunepipe run` itself."""
    # Not --smoke: smoke pins 3 steps and skips the loss_falling gate. 10 SFT steps logged one by one
    # are enough for the gate (training.loss_falling_gate: auto checks runs of 10+ logged steps); 3 DPO
    # steps show DPO runs on the 4-bit SFT model (too few for its gate: auto leaves it unchecked).
    cfg = write_config(tmp_path, tiny_qwen3_64, training={"logging_steps": 1})
    steps = ["sft.max_steps=10", "dpo.max_steps=3", f"hardware.processes={processes}"]
    done = tunepipe("run", cfg, *QLORA, *steps, env=CPU_ONLY)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    run = tmp_path / "runs" / "test"

    # Every stage that loads the model loads it in 4-bit on the CPU: SFT, DPO (the base of the SFT
    # merge) and eval (base, sft, dpo).
    line = f"model: {LINEARS} linear layers in 4-bit NF4 (Linear4bit, bitsandbytes"
    assert line in (run / "logs" / "sft.log").read_text()
    assert "on the CPU), float32 compute, uint8 storage" in (run / "logs" / "sft.log").read_text()
    assert line in (run / "logs" / "dpo.log").read_text()
    assert (run / "logs" / "eval.log").read_text().count(line) == 3
    # No refusal of 4-bit on the CPU (flash-attn's own "needs a CUDA GPU" reason is fine).
    assert (
        not re.search(r"(4-bit|4bit|QLoRA|qlora)[^\n]*needs a CUDA GPU", out)
        and "gemm_4bit_forward" not in out
    )

    # SFT: finite losses, falling (the stage's own gate, and first vs last step here).
    losses = [r["loss"] for r in _log(run, "sft")]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    sft = json.loads((run / "sft" / "stage.json").read_text())
    assert sft["status"] == "done" and sft["outputs"]["world_size"] == processes
    gate = next(g for g in sft["gates"] if g["name"] == "loss_falling")
    assert gate["passed"] and not gate["detail"].startswith("not checked"), gate

    # Adapters saved and trained: LoRA B starts at zero, so non-zero B means the optimizer moved it.
    from safetensors.torch import load_file

    for stage in ("sft", "dpo"):
        tensors = load_file(str(run / stage / "adapter" / "adapter_model.safetensors"))
        b = [t for k, t in tensors.items() if "lora_B" in k]
        assert len(b) == LINEARS and all(t.abs().sum() > 0 for t in b), stage

    # DPO ran after SFT, on the SFT model, with the policy's disabled adapter as the reference.
    dpo = json.loads((run / "dpo" / "stage.json").read_text())
    assert dpo["status"] == "done" and dpo["outputs"]["reference"] == "adapter"
    assert dpo["outputs"]["world_size"] == processes
    assert dpo["outputs"]["starts_from"] == "sft" and dpo["started_at"] >= sft["started_at"]
    assert all(math.isfinite(r["loss"]) for r in _log(run, "dpo"))

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"base", "sft", "dpo"} <= set(metrics)
    # Ten SFT steps at lr 1e-2 on the skills data lower the held-out loss of the 4-bit model.
    assert metrics["sft"]["sft_eval"]["loss"] < metrics["base"]["sft_eval"]["loss"]


@pytest.mark.skipif(cuda_available(), reason="loads in this process: on a GPU machine that is the GPU")
def test_load_model_quantizes_the_linear_layers_with_the_planned_dtypes(
    tmp_path: Path, tiny_qwen3_64: Path
) -> None:
    import bitsandbytes as bnb
    import torch

    cfg = load_config(write_config(tmp_path, tiny_qwen3_64), QLORA)
    plan = plan_for(cfg.model)
    assert plan.device == "cpu" and plan.dtype == "float32"
    # On the CPU no device map, also under several processes: each loads its whole 4-bit model.
    assert "device_map" not in load_kwargs(cfg, plan, env={"WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    lines: list[str] = []
    model = load_model(cfg, plan, log=lines.append)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == LINEARS and lines == [lines[0]] and f"{LINEARS} linear layers" in lines[0]
    for layer in quantized:
        assert layer.compute_dtype == torch.float32  # the plan's dtype: fp32 on CPU
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == "nf4"
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # tied to the embeddings, kept in fp32
    assert model.lm_head.weight.dtype == torch.float32

    # bnb_4bit_quant_storage as configured (bfloat16 is what ZeRO-3 shards).
    cfg16 = load_config(
        write_config(tmp_path, tiny_qwen3_64), [*QLORA, "model.bnb_4bit_quant_storage=bfloat16"]
    )
    layer16 = next(
        m for m in load_model(cfg16, plan, log=lambda _m: None).modules() if isinstance(m, bnb.nn.Linear4bit)
    )
    assert layer16.weight.dtype == torch.bfloat16 and layer16.compute_dtype == torch.float32


def test_an_old_bitsandbytes_is_refused_with_the_fix(tmp_path: Path, tiny_qwen3_64: Path) -> None:
    """A stand-in bitsandbytes 0.45.5 first on the path (its metadata is what the check reads): loading
    stops with a ConfigError naming the pip command and the LoRA alternative, before transformers."""
    site = tmp_path / "site"
    (site / "bitsandbytes").mkdir(parents=True)
    (site / "bitsandbytes" / "__init__.py").write_text("")
    (site / "bitsandbytes-0.45.5.dist-info").mkdir()
    (site / "bitsandbytes-0.45.5.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.45.5\n"
    )
    cfg = write_config(tmp_path, tiny_qwen3_64)
    code = (
        "import sys\n"
        "from tunepipe.config import ConfigError, load_config\n"
        "from tunepipe.modeling import load_model, plan_for\n"
        f"cfg = load_config({str(cfg)!r}, {QLORA!r})\n"
        "try:\n"
        "    load_model(cfg, plan_for(cfg.model))\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "    sys.exit(2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **CPU_ONLY, "PYTHONPATH": str(site)},
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr[-3000:]
    message = done.stdout
    assert "model.load_in_4bit (QLoRA) cannot run on the CPU here" in message
    assert "bitsandbytes 0.45.5 is older than 0.46.1" in message
    assert (
        "Fix: pip install 'bitsandbytes>=0.46.1,<0.51'; or model.load_in_4bit: false with method: lora"
        in message
    )
