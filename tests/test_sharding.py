"""hardware.sharding: the generated arguments go through the real parsers (transformers, TRL, accelerate,
DeepSpeed), the QLoRA storage rule, the decoder-layer class, and FSDP2 against DDP on 2 CPU processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunepipe import sharding
from tunepipe.config import load_config

ROOT = Path(__file__).resolve().parent.parent
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED,
    reason="deepspeed is not installed (pip install -e '.[deepspeed]'): transformers refuses a DeepSpeed "
    "config without it",
)


def _unchecked(*overrides: str):
    """A config without load_config's own checks (which already reject some of what check() finds)."""
    from tunepipe.config import apply_overrides
    from tunepipe.stages.registry import config_model

    return config_model().model_validate(apply_overrides({}, list(overrides)))


def _cfg(model: Path | str, *overrides: str):
    return load_config(None, [f"model.name_or_path={model}", "hardware.processes=2", *overrides])


def _args(tmp_path: Path, kwargs: dict, cls=None):
    from transformers import TrainingArguments

    return (cls or TrainingArguments)(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **kwargs
    )


# --------------------------------------------------------------------------- arguments


def test_ddp_adds_nothing(tiny_llama: Path) -> None:
    assert sharding.trainer_kwargs(_cfg(tiny_llama), "sft", "cpu", 2) == {}


def test_one_process_has_nothing_to_shard(tiny_llama: Path) -> None:
    for kind in ("fsdp", "zero2", "zero3"):
        cfg = _cfg(tiny_llama, f"hardware.sharding={kind}", "hardware.processes=1")
        assert sharding.trainer_kwargs(cfg, "sft", "cpu", 1) == {}
        assert [a.name for a in sharding.advice(cfg)] == ["sharding"]


def test_fsdp_arguments_parse_into_accelerates_fsdp2_plugin(tmp_path: Path, tiny_llama: Path) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    cfg = _cfg(tiny_llama, "hardware.sharding=fsdp")
    kw = sharding.trainer_kwargs(cfg, "sft", "cpu", 2, checkpointing=True)
    # FSDP's own checkpointing replaces the trainer's (transformers refuses both at once).
    assert kw["activation_checkpointing"] is False and kw["fsdp_config"]["activation_checkpointing"] is True
    args = _args(tmp_path, kw)
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.activation_checkpointing is True and plugin.cpu_ram_efficient_loading is False
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT  # LoRA: small adapter checkpoints

    full = _cfg(tiny_llama, "hardware.sharding=fsdp", "sft.method=full")
    args = _args(tmp_path, sharding.trainer_kwargs(full, "sft", "cpu", 2, checkpointing=False))
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT and not plugin.activation_checkpointing


def test_fsdp_arguments_build_trl_configs(tmp_path: Path, tiny_qwen3: Path) -> None:
    from trl import DPOConfig, SFTConfig

    cfg = _cfg(tiny_qwen3, "hardware.sharding=fsdp")
    for stage, cls in (("sft", SFTConfig), ("dpo", DPOConfig)):
        args = _args(tmp_path, sharding.trainer_kwargs(cfg, stage, "cpu", 2, checkpointing=False), cls)
        assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "Qwen3DecoderLayer"


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_pass_transformers_deepspeed_parser(
    tmp_path: Path, tiny_llama: Path, stage: int
) -> None:
    cfg = _cfg(tiny_llama, f"hardware.sharding=zero{stage}")
    kw = sharding.trainer_kwargs(cfg, "sft", "cpu", 2)
    args = _args(
        tmp_path,
        {**kw, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "max_grad_norm": 0.5},
    )
    ds = args.hf_deepspeed_config
    assert ds.get_value("zero_optimization.stage") == stage and ds.is_zero3() is (stage == 3)
    # "auto" values are the trainer's: micro-batch, accumulation, clipping, precision.
    assert ds.get_value("train_micro_batch_size_per_gpu") == 2
    assert ds.get_value("gradient_accumulation_steps") == 4 and ds.get_value("gradient_clipping") == 0.5
    assert ds.get_value("bf16.enabled") is False  # use_cpu without bf16: the plan's precision
    if stage == 3:
        assert ds.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True


def test_zero_configs_are_the_shipped_ones() -> None:
    for stage in (2, 3):
        shipped = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
        assert sharding.deepspeed_config(stage) == shipped


def test_users_deepspeed_json_wins(tmp_path: Path, tiny_llama: Path) -> None:
    ds = tmp_path / "mine.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    cfg = _cfg(tiny_llama, "hardware.sharding=zero2", f"hardware.deepspeed={ds}")
    assert sharding.trainer_kwargs(cfg, "sft", "cpu", 2) == {"deepspeed": str(ds)}
    r = sharding.resolve(cfg)
    assert (r.kind, r.zero_stage, r.offload_optimizer) == ("deepspeed", 3, True)
    assert "the JSON wins" in sharding.advice(cfg)[0].detail
    # Written before hardware.sharding existed: the JSON alone means DeepSpeed at its stage.
    legacy = _cfg(tiny_llama, f"hardware.deepspeed={ds}")
    assert sharding.resolve(legacy).label == "zero3" and not sharding.check(legacy)


def test_deepspeed_json_with_ddp_or_fsdp_is_a_contradiction(tmp_path: Path, tiny_llama: Path) -> None:
    ds = ROOT / "configs" / "deepspeed" / "zero2.json"
    for kind in ("ddp", "fsdp"):
        problems = sharding.check(_cfg(tiny_llama, f"hardware.sharding={kind}", f"hardware.deepspeed={ds}"))
        assert len(problems) == 1 and "set hardware.sharding: zero2 or zero3" in problems[0]
    missing = sharding.check(_unchecked(f"hardware.deepspeed={tmp_path / 'nope.json'}"))
    assert len(missing) == 1 and "cannot read" in missing[0]


# --------------------------------------------------------------------------- QLoRA storage rule


QLORA = ["model.load_in_4bit=true", "sft.method=qlora", "dpo.method=qlora"]


@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_qlora_sharding_weights_needs_bf16_quant_storage(kind: str) -> None:
    problems = sharding.check(load_config(None, [*QLORA, f"hardware.sharding={kind}"]))
    assert len(problems) == 1 and "; set model.bnb_4bit_quant_storage: bfloat16" in problems[0]
    assert not sharding.check(
        load_config(None, [*QLORA, f"hardware.sharding={kind}", "model.bnb_4bit_quant_storage=bfloat16"])
    )


def test_qlora_with_ddp_or_zero2_keeps_uint8_storage() -> None:
    for kind in ("ddp", "zero2"):
        assert not sharding.check(load_config(None, [*QLORA, f"hardware.sharding={kind}"]))


def test_qlora_zero3_through_a_json_and_fsdp_dtype() -> None:
    ds = ROOT / "configs" / "deepspeed" / "zero3.json"
    assert "ZeRO-3" in sharding.check(_unchecked(*QLORA, f"hardware.deepspeed={ds}"))[0]
    fp16 = sharding.check(
        load_config(
            None,
            [
                *QLORA,
                "hardware.sharding=fsdp",
                "model.bnb_4bit_quant_storage=bfloat16",
                "model.dtype=float16",
            ],
        )
    )
    assert len(fp16) == 1 and "model.dtype: bfloat16" in fp16[0]


# --------------------------------------------------------------------------- decoder layer class


def test_layer_class_from_tiny_model_folders(tiny_llama: Path, tiny_qwen3: Path) -> None:
    for folder, name in ((tiny_llama, "LlamaDecoderLayer"), (tiny_qwen3, "Qwen3DecoderLayer")):
        names, how = sharding.decoder_layer_classes(_cfg(folder))
        assert names == [name] and "Config of" in how


def test_layer_class_from_configs_without_weights() -> None:
    from transformers import LlamaConfig, PretrainedConfig, Qwen3Config

    assert sharding.layer_classes_of(LlamaConfig(num_hidden_layers=1)) == ["LlamaDecoderLayer"]
    assert sharding.layer_classes_of(Qwen3Config(num_hidden_layers=1)) == ["Qwen3DecoderLayer"]
    # A remote-code architecture transformers does not map: by its naming convention.
    assert sharding.layer_classes_of(PretrainedConfig(architectures=["FancyForCausalLM"])) == [
        "FancyDecoderLayer"
    ]
    assert sharding.layer_classes_of(PretrainedConfig()) == []


def test_layer_class_by_name_when_the_model_is_not_here() -> None:
    names, how = sharding.decoder_layer_classes(load_config(None, ["model.name_or_path=Qwen/Qwen3-8B"]))
    assert names == ["Qwen3DecoderLayer"] and "by the model's name" in how
    names, _ = sharding.decoder_layer_classes(load_config(None, ["model.name_or_path=someone/unknown-7b"]))
    assert names == []
    # Without a class name the fsdp_config leaves wrapping to the loaded model's _no_split_modules.
    cfg = load_config(None, ["model.name_or_path=someone/unknown-7b"])
    assert "transformer_layer_cls_to_wrap" not in sharding.fsdp_config(cfg, "sft", "cuda", False)


# --------------------------------------------------------------------------- FSDP2 vs DDP on CPU

WORKER = r"""
import json, os, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from tunepipe import sharding
from tunepipe.config import load_config

model_dir, kind, out, resume = sys.argv[1:5]
cfg = load_config(None, [f"model.name_or_path={model_dir}", f"hardware.sharding={kind}",
                         "hardware.processes=2", "model.dtype=float32"])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
g = torch.Generator().manual_seed(1)
rows = []
for _ in range(40):
    ids = torch.randint(0, model.config.vocab_size, (16,), generator=g)
    rows.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(16, dtype=torch.long)})
losses = []
class Record(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            losses.append([state.global_step, logs["loss"]])
args = TrainingArguments(
    output_dir=out, per_device_train_batch_size=2, learning_rate=1e-2, max_steps=5, logging_steps=1,
    save_strategy="steps", save_steps=3, use_cpu=True, report_to="none", seed=0, data_seed=0,
    lr_scheduler_type="constant", ddp_find_unused_parameters=False, disable_tqdm=True,
    **sharding.trainer_kwargs(cfg, "sft", "cpu", int(os.environ["WORLD_SIZE"]), checkpointing=False))
trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Record()])
forced = sharding.prepare_trainer(trainer)
trainer.train(resume_from_checkpoint=resume if resume != "-" else None)
from torch.distributed.tensor import DTensor
params = [p for p in trainer.model_wrapped.parameters()]
local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
sharding.before_final_save(trainer)
trainer.save_model(os.path.join(out, "final"))  # every process: FSDP gathers
if int(os.environ["RANK"]) == 0:
    result = {"losses": losses, "forced": forced, "dtensors": sum(isinstance(p, DTensor) for p in params),
              "params": len(params), "local": local, "full": sum(p.numel() for p in params),
              "final": sorted(os.listdir(os.path.join(out, "final")))}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)
"""


def _launch(tmp_path: Path, model: Path, kind: str, out: Path, resume: str = "-") -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run(
        [*cmd, str(script), str(model), kind, str(out), resume],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.multiproc
def test_fsdp2_on_two_cpu_processes_matches_ddp_and_resumes(tmp_path: Path, tiny_llama: Path) -> None:
    ddp = _launch(tmp_path, tiny_llama, "ddp", tmp_path / "ddp")
    fsdp = _launch(tmp_path, tiny_llama, "fsdp", tmp_path / "fsdp")
    assert ddp["dtensors"] == 0 and not ddp["forced"]
    # Really sharded: accelerate alone would have trained DDP here; every parameter is a DTensor
    # holding about half of the values on each of the 2 processes.
    assert fsdp["forced"] and fsdp["dtensors"] == fsdp["params"] > 0
    assert fsdp["local"] <= 0.6 * fsdp["full"]
    assert [s for s, _ in fsdp["losses"]] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(ddp["losses"], fsdp["losses"], strict=True):
        assert abs(a - b) < 1e-3
    assert "adapter_model.safetensors" in fsdp["final"]
    # Resume from the step-3 checkpoint (FULL state dict for LoRA): steps 4 and 5 as uninterrupted.
    resumed = _launch(
        tmp_path, tiny_llama, "fsdp", tmp_path / "fsdp", str(tmp_path / "fsdp" / "checkpoint-3")
    )
    assert [s for s, _ in resumed["losses"]] == [4, 5]
    for (_, a), (_, b) in zip(fsdp["losses"][3:], resumed["losses"], strict=True):
        assert abs(a - b) < 1e-5
