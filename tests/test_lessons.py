"""The field's lessons, as code: attention choice, library drift, 4-bit/DDP device maps,
gradient checkpointing policy, precision. Each checked on this machine's real libraries."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunepipe.compat import adapt_kwargs, build
from tunepipe.config import load_config
from tunepipe.modeling import Plan, cpu_supports_bf16, load_kwargs, plan_for, resolve_attention
from tunepipe.plan import Machine, resolve_plan
from tunepipe.training import trainer_args

GPU_PLAN = Plan("cuda", "sdpa", "test", "bfloat16", False, "a GPU plan, built by hand: no GPU here")


def _cfg(tmp_path: Path, **sections) -> object:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(sections))
    return load_config(path)


def test_attention_auto_is_sdpa_with_the_reason_when_flash_attn_cannot_run() -> None:
    impl, why = resolve_attention("auto")
    assert impl == "sdpa"  # this machine has no CUDA GPU, so flash-attn cannot run here
    assert why == "no CUDA GPU here: flash-attn needs a CUDA GPU"
    assert resolve_attention("eager") == ("eager", "set in model.attn_implementation")


def test_compat_maps_todays_names_onto_an_older_signature() -> None:
    class OldTrainer:  # the shape of TRL < 0.12 / transformers < 4.46
        def __init__(self, model, args=None, tokenizer=None, max_seq_length=None, torch_dtype=None):
            self.got = {
                "model": model,
                "tokenizer": tokenizer,
                "max_seq_length": max_seq_length,
                "torch_dtype": torch_dtype,
            }

    logged: list[str] = []
    t = build(
        OldTrainer,
        log=logged.append,
        model="m",
        processing_class="tok",
        max_length=512,
        dtype="bf16",
        brand_new_option=True,
    )
    assert t.got == {"model": "m", "tokenizer": "tok", "max_seq_length": 512, "torch_dtype": "bf16"}
    assert logged == ["compat: OldTrainer in the installed version does not take brand_new_option; ignored"]


def test_compat_passes_todays_names_to_the_installed_trl() -> None:
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    good, dropped = adapt_kwargs(SFTTrainer, {"processing_class": 1, "peft_config": 2})
    assert good == {"processing_class": 1, "peft_config": 2} and dropped == []
    for cls in (SFTConfig, DPOConfig):
        good, dropped = adapt_kwargs(cls, {"max_length": 64, "gradient_checkpointing": True})
        assert good == {"max_length": 64, "gradient_checkpointing": True} and not dropped
    assert "processing_class" in adapt_kwargs(DPOTrainer, {"processing_class": 1})[0]


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_ddp_and_4bit_put_the_whole_model_on_the_local_gpu(tmp_path: Path, load_in_4bit: bool) -> None:
    cfg = _cfg(
        tmp_path,
        model={"load_in_4bit": load_in_4bit},
        sft={"method": "qlora" if load_in_4bit else "lora"},
        dpo={"method": "qlora" if load_in_4bit else "lora"},
    )
    # The plan decides the map (resolve_plan, from the process count); the environment names the GPU.
    four_gpus = resolve_plan(cfg, Machine("cuda", "CUDA GPU here", gpus=4, gpu_bf16=True, processes=4))
    under_ddp = load_kwargs(cfg, four_gpus, {"WORLD_SIZE": "4", "LOCAL_RANK": "3"})
    assert under_ddp["device_map"] == {"": 3}
    one_gpu = resolve_plan(cfg, Machine("cuda", "CUDA GPU here", gpus=1, gpu_bf16=True))
    single = load_kwargs(cfg, one_gpu, {})
    if load_in_4bit:
        assert single["device_map"] == {"": 0}
        q = single["quantization_config"]
        assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4"
    else:
        assert "device_map" not in single and "quantization_config" not in single
    assert load_kwargs(cfg, plan_for(cfg.model), {"WORLD_SIZE": "2"}).get("device_map") is None  # CPU: no map
    assert load_kwargs(cfg, GPU_PLAN, {})["trust_remote_code"] is False


def test_gradient_checkpointing_policy(tmp_path: Path) -> None:
    from trl import DPOConfig, SFTConfig

    cfg = _cfg(tmp_path)
    sft_gpu = trainer_args(cfg, "sft", tmp_path, GPU_PLAN, SFTConfig, smoke=False)
    key = "activation_checkpointing"  # transformers' current name; compat maps it for older releases
    assert sft_gpu[key] is True
    assert sft_gpu[f"{key}_kwargs"] == {"use_reentrant": False}  # works with LoRA and DDP
    assert trainer_args(cfg, "dpo", tmp_path, GPU_PLAN, DPOConfig, smoke=False)[key] is False
    cpu = plan_for(cfg.model)
    assert trainer_args(cfg, "sft", tmp_path, cpu, SFTConfig, smoke=False)[key] is False
    asked = _cfg(tmp_path, dpo={"gradient_checkpointing": True})
    assert trainer_args(asked, "dpo", tmp_path, GPU_PLAN, DPOConfig, smoke=False)[key] is True


def test_checkpointing_rename_reaches_old_and_new_transformers(tmp_path: Path) -> None:
    """The installed transformers takes activation_checkpointing (and mirrors it to the deprecated
    gradient_checkpointing that TRL reads) without a FutureWarning; a release that only knows the
    old name gets the old name."""
    import dataclasses
    import warnings

    from trl import SFTConfig

    @dataclasses.dataclass
    class OldArgs:
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    new = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
    assert adapt_kwargs(OldArgs, new)[0] == {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, **adapt_kwargs(SFTConfig, new)[0])
    assert args.gradient_checkpointing is True and args.gradient_checkpointing_kwargs == {
        "use_reentrant": False
    }


def test_precision_on_this_cpu(tmp_path: Path) -> None:
    plan = plan_for(_cfg(tmp_path).model)
    assert plan.device == "cpu" and plan.dtype == "float32"
    assert plan.bf16_autocast is cpu_supports_bf16()
    assert ("bf16 autocast" in plan.reason) is cpu_supports_bf16()
    from trl import SFTConfig

    args = trainer_args(_cfg(tmp_path), "sft", tmp_path, plan, SFTConfig, smoke=False)
    assert args["bf16"] is plan.bf16_autocast and args["fp16"] is False and args["use_cpu"] is True
    gpu_fp16 = Plan("cuda", "sdpa", "", "float16", False, "an older GPU without bf16")
    args = trainer_args(_cfg(tmp_path), "sft", tmp_path, gpu_fp16, SFTConfig, smoke=False)
    assert args["fp16"] is True and args["bf16"] is False  # fp16 brings the trainer's loss scaling


def test_float32_switches_cpu_autocast_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.dtype: float32 is fp32 throughout (no bf16 autocast), so the autocast gain can be measured
    on its own; auto keeps it where the CPU has bf16 (made so here, whatever this CPU has)."""
    from trl import SFTConfig

    from tunepipe import modeling

    monkeypatch.setattr(modeling, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(modeling, "cuda_available", lambda: False)  # the CPU plan, on any machine
    assert plan_for(_cfg(tmp_path).model).bf16_autocast is True
    cfg = _cfg(tmp_path)
    cfg.model.dtype = "float32"
    plan = plan_for(cfg.model)
    assert plan.device == "cpu" and plan.dtype == "float32" and plan.bf16_autocast is False
    assert trainer_args(cfg, "sft", tmp_path, plan, SFTConfig, smoke=False)["bf16"] is False
