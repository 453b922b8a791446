"""`tunepipe doctor` on this CPU-only machine: the checks of the machine, the plan of a config for its
target hardware, the exit code and the JSON. GPU machines are described with an `Environment` value
(what a probe would return there), passed to `config_report`; nothing is patched."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT

from tunepipe import doctor
from tunepipe.config import load_config
from tunepipe.doctor import GPU, Environment, config_report, environment_checks, run_doctor

QWEN = ROOT / "examples" / "qwen3-4b-sft-dpo.yaml"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"

cpu_only = pytest.mark.skipif(
    doctor.probe_environment().cuda_available, reason="describes a machine without a GPU"
)


def _planner_has_estimates() -> bool:
    try:
        from tunepipe import planner
    except ImportError:
        return False
    return hasattr(planner, "estimate_memory") and hasattr(planner, "estimate_time")


needs_planner = pytest.mark.xfail(not _planner_has_estimates(), reason="planner not merged", strict=True)


def doctor_text(config: Path | None, *overrides: str) -> tuple[int, str]:
    lines: list[str] = []
    code = run_doctor(config, list(overrides), False, lines.append)
    return code, "\n".join(lines)


def doctor_json(config: Path | None, *overrides: str) -> tuple[int, dict]:
    lines: list[str] = []
    code = run_doctor(config, list(overrides), True, lines.append)
    return code, json.loads("\n".join(lines))


def gpu_machine(**changes: object) -> Environment:
    """What the probe returns on a 4×H100 node with flash-attn, bitsandbytes and NCCL working."""
    env = Environment(
        torch_version="2.13.0+cu128",
        torch_cuda="12.8",
        cuda_available=True,
        driver="570.86",
        driver_cuda="12.8",
        smi_gpus=["NVIDIA H100 80GB HBM3"] * 4,
        gpus=[GPU("NVIDIA H100 80GB HBM3", 79.1, True, "9.0")] * 4,
        nccl="2.26.2",
        flash_attn=("ok", "2.8.3: flash-attn imports and runs"),
        bitsandbytes=("ok", "0.48.0: native library loads (CUDA)"),
        bnb_cuda=True,
        deepspeed=("skip", "not installed (needed only with hardware.deepspeed)"),
        cpu_bf16=False,
        ram_gb=512.0,
    )
    return replace(env, **changes)


def by_name(checks: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in checks}


# --------------------------------------------------------------------------- this machine


@cpu_only
def test_checks_of_this_cpu_machine_say_no_gpu_and_sdpa() -> None:
    checks = {c.name: c for c in environment_checks()}
    assert checks["python"].status == "ok"
    assert "CPU build" in checks["torch"].detail
    assert checks["gpu"].status == "warn" and "no CUDA GPU" in checks["gpu"].detail
    assert checks["gpu"].fix and not checks["gpu"].blocking
    assert checks["flash-attn"].status in ("skip", "fail") and "sdpa" in checks["flash-attn"].detail
    assert checks["nccl"].status == "skip"
    for lib in ("transformers", "trl", "peft", "accelerate", "datasets"):
        assert checks[lib].status in ("ok", "warn"), checks[lib]
    assert "free" in checks["disk"].detail and "offline" in checks["hub cache"].detail
    # Optional GPU libraries missing on a CPU machine: reported with the pip command, never blocking alone.
    for lib in ("bitsandbytes", "deepspeed"):
        if "not installed" in checks[lib].detail:
            assert checks[lib].fix and "pip install" in checks[lib].fix and not checks[lib].blocking


@cpu_only
def test_doctor_without_config_exits_0_and_prints_the_machine() -> None:
    code, text = doctor_text(None)
    assert code == 0
    assert "no CUDA GPU on this machine" in text and "Plan for" not in text
    assert text.splitlines()[-1].startswith("ready")


def test_doctor_reads_the_ranges_of_pyproject_and_the_pins_of_constraints() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {Requirement(d).name: str(Requirement(d).specifier) for d in deps}
    ranges, pins = doctor.supported_ranges(), doctor.tested_versions()
    for name in doctor.VERSIONED:
        assert ranges[name] == declared[name], name
        # Every pinned version is inside the supported range, and `make install` installed it.
        assert SpecifierSet(ranges[name]).contains(pins[name]), (name, pins[name])
        installed = doctor._pkg_version(name)
        assert installed is not None and installed.split("+")[0] == pins[name], (name, installed)
    # bitsandbytes (QLoRA): the fixes name pyproject's range, and the pin that `make install` installs
    # is inside it and new enough for 4-bit layers on the CPU.
    from tunepipe.modeling import BNB_INSTALL, BNB_MIN_VERSION

    in_fix = Requirement(BNB_INSTALL.removeprefix("pip install ").strip("'"))
    assert in_fix.specifier == SpecifierSet(declared["bitsandbytes"])
    assert SpecifierSet(declared["bitsandbytes"]).contains(pins["bitsandbytes"])
    assert tuple(map(int, pins["bitsandbytes"].split("."))) >= BNB_MIN_VERSION
    assert doctor._pkg_version("bitsandbytes") == pins["bitsandbytes"]
    assert doctor._version_check("transformers", "4.57.0").status == "fail"
    assert doctor._version_check("transformers", "6.1.0").status == "warn"
    ok = doctor._version_check("transformers", pins["transformers"])
    assert ok.status == "ok" and f"tested with {pins['transformers']}" in ok.detail


# --------------------------------------------------------------------------- the reference config


@cpu_only
def test_qwen3_example_on_cpu_explains_no_gpu_and_prints_the_plan() -> None:
    code, text = doctor_text(QWEN)
    assert code == 2  # the model is not cached here and the data files are placeholders
    assert "this machine has no GPU: the plan below is for the target (4× GPU 80 GB" in text
    assert "flash-attn could not be probed on this machine" in text and "sdpa is the safe default" in text
    for stage in ("sft (qlora)", "dpo (qlora)"):
        assert stage in text
    assert text.count("attention        sdpa") == 2
    assert text.count("4-bit NF4 (bitsandbytes)") == 2
    assert text.count('device map       {"": local_rank}') == 2
    assert "2 per device × 8 accumulation × 4 process(es) = 64" in text
    assert "1 per device × 16 accumulation × 4 process(es) = 64" in text
    # auto: checkpointing only where the memory plan needs it; 2 x 4096 tokens per micro-batch (SFT
    # batch 2, DPO chosen + rejected) would not fit 80 GB without it.
    assert text.count("checkpointing    on (non-reentrant): auto: on, without it the plan needs ~") == 2
    # QLoRA is no blocker here: bitsandbytes' NF4 layers run on this CPU (probed with one layer).
    here = r"ok\s+qlora on CPU\s+no CUDA GPU here: bitsandbytes [\d.]+: NF4 layers run on the CPU"
    assert re.search(here, text)
    assert "qlora here" not in text and "needs a CUDA GPU" not in text


@cpu_only
@needs_planner
def test_qwen3_example_prints_memory_per_h100_for_sft_and_dpo() -> None:
    code, text = doctor_text(QWEN)
    assert "4.02B parameters, 36 layers; shape from built-in table" in text  # Qwen3-4B is not cached here
    per_gpu = re.findall(r"memory per GPU\s+~([\d.]+) GB of 80 GB \(H100 80GB\): (fits|does NOT fit)", text)
    assert len(per_gpu) == 2, text
    (sft_gb, sft_verdict), (dpo_gb, _) = ((float(gb), v) for gb, v in per_gpu)
    # NF4 weights (~2.5 GB) + LoRA + activations of 2 x 4096 tokens with checkpointing: fits an H100.
    assert 5 < sft_gb < 80 and sft_verdict == "fits"
    assert dpo_gb > 5
    for component in ("weights", "trainable", "optimizer", "activations", "logits", "overhead"):
        assert text.count(f"      {component} ") == 2, component
    _, report = doctor_json(QWEN)
    for stage in ("sft", "dpo"):
        mem = report["plan"]["stages"][stage]["memory"]
        assert mem["available"] and mem["device"] == "cuda" and mem["capacity_gb"] == 80
        assert sum(row["bytes"] for row in mem["components"]) == mem["total_bytes"]
        tm = report["plan"]["stages"][stage]["time"]
        assert tm["budget_s"] > 0 and tm["seconds_per_step"] > 0  # no data here: per step, not in total
    assert report["plan"]["stages"]["dpo"]["memory"]["fits"]  # auto turned checkpointing on for it
    # Forced off, DPO at 2 x 4096 tokens does not fit: the fix names the setting that makes it fit.
    _, off = doctor_json(QWEN, "dpo.gradient_checkpointing=false")
    problem = by_name(off["plan"]["incompatibilities"])["dpo memory"]
    assert problem["fix"].startswith("dpo.gradient_checkpointing=true")


@cpu_only
def test_json_has_the_checks_and_the_plan() -> None:
    code, report = doctor_json(QWEN)
    assert code == report["exit_code"] == 2
    checks = by_name(report["checks"])
    expected = {"python", "torch", "gpu", "flash-attn", "bitsandbytes", "deepspeed", "nccl", "disk"}
    assert expected <= set(checks)
    plan = report["plan"]
    assert plan["target"] == {
        "gpus": 4,
        "gpu_memory_gb": 80,
        "nodes": 1,
        "processes": 4,
        "sharding": "ddp",
        "sharding_plan": "ddp over 4 process(es): a whole copy of the model in each (hardware.sharding: ddp)",
        "deepspeed": None,
        "time_limit": "24h",
        "description": "4× GPU 80 GB",
    }
    sft, dpo = plan["stages"]["sft"], plan["stages"]["dpo"]
    assert sft["attention"]["value"] == dpo["attention"]["value"] == "sdpa"
    assert sft["dtype"]["value"] == "bfloat16" and sft["device_map"]["value"] == '{"": local_rank}'
    assert sft["batch"] == {"per_device": 2, "accumulation": 8, "processes": 4, "effective": 64}
    assert dpo["batch"]["effective"] == 64
    assert sft["gradient_checkpointing"]["enabled"] and dpo["gradient_checkpointing"]["enabled"]
    assert sft["time"]["budget_s"] == pytest.approx(12 * 3600)  # sft's share 0.5 of 24h
    problems = by_name(plan["incompatibilities"])
    assert problems["qlora on CPU"]["status"] == "ok" and not problems["qlora on CPU"]["blocking"]
    assert not any(name.startswith("qlora") for name in report["blocking"])


# --------------------------------------------------------------------------- exit codes and fixes


def test_quickstart_is_ready() -> None:
    code, text = doctor_text(QUICKSTART)
    assert code == 0, text
    assert "no GPU; the config plans for CPU (hardware.gpus: 0)" in text
    assert text.count("attention        sdpa: CPU target") == 2
    assert "8 per device × 1 accumulation × 1 process(es) = 8" in text


def test_bad_config_gives_exit_2_and_the_fix() -> None:
    code, text = doctor_text(QUICKSTART, "sft.method=qlora")
    assert code == 2
    assert "sft.method: qlora needs model.load_in_4bit: true" in text
    assert "fix: set model.load_in_4bit: true, or method: lora" in text
    assert "(got {" not in text  # the whole config is not echoed back
    code, report = doctor_json(QUICKSTART, "dpo.method=full", "dpo.reference=adapter")
    assert code == 2 and report["plan"] is None
    assert report["config_errors"][0]["fix"] == "use reference: copy or precompute"


def test_unknown_key_names_the_nearest_key() -> None:
    code, text = doctor_text(QUICKSTART, "sft.learning_rat=1e-4")
    assert code == 2 and "fix: rename the key to 'sft.learning_rate'" in text


def test_qlora_on_a_cpu_target_is_ready_where_bitsandbytes_runs_on_the_cpu() -> None:
    code, report = doctor_json(QUICKSTART, "model.load_in_4bit=true", "sft.method=qlora", "dpo.method=qlora")
    assert code == 0, report["blocking"]
    assert by_name(report["checks"])["bitsandbytes"]["status"] == "ok"
    check = by_name(report["plan"]["incompatibilities"])["qlora on CPU"]
    assert check["status"] == "ok" and "NF4 layers run on the CPU" in check["detail"]
    sft = report["plan"]["stages"]["sft"]
    assert sft["quantization"].startswith("4-bit NF4 (bitsandbytes), double quantization, float32 compute")
    assert "4-bit model in RAM" in sft["device_map"]["reason"]


def _old_bitsandbytes(folder: Path) -> Path:
    """A stand-in bitsandbytes 0.45.5 (installed metadata and an empty package) to put first on
    PYTHONPATH: what a machine with a release older than the first CPU-capable one looks like."""
    (folder / "bitsandbytes").mkdir(parents=True)
    (folder / "bitsandbytes" / "__init__.py").write_text('__version__ = "0.45.5"\n')
    info = folder / "bitsandbytes-0.45.5.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.45.5\n")
    return folder


@cpu_only
def test_qlora_on_cpu_with_an_old_bitsandbytes_blocks_with_the_fix(tmp_path: Path) -> None:
    from conftest import tunepipe

    env = {"PYTHONPATH": str(_old_bitsandbytes(tmp_path / "site"))}
    qlora = ["model.load_in_4bit=true", "sft.method=qlora", "dpo.method=qlora"]
    done = tunepipe("doctor", QUICKSTART, *qlora, "--json", env=env)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout)
    machine = by_name(report["checks"])["bitsandbytes"]
    assert machine["status"] == "warn" and "0.45.5: older than 0.46.1" in machine["detail"]
    problem = by_name(report["plan"]["incompatibilities"])["qlora on CPU"]
    assert problem["blocking"] and "0.45.5 is older than 0.46.1" in problem["detail"]
    assert problem["fix"].startswith("pip install 'bitsandbytes>=0.46.1,<0.51'; or model.load_in_4bit: false")
    assert report["blocking"] == ["qlora on CPU"]


def test_deepspeed_named_but_not_installed_blocks() -> None:
    if doctor.probe_environment().deepspeed[0] == "ok":
        pytest.skip("deepspeed is installed here")
    code, report = doctor_json(QUICKSTART, "hardware.deepspeed=../configs/deepspeed/zero2.json")
    assert code == 2
    problems = by_name(report["plan"]["incompatibilities"])
    assert problems["deepspeed"]["blocking"] and "pip install deepspeed" in problems["deepspeed"]["fix"]
    # ZeRO runs on CPU processes too (DeepSpeed's CPU accelerator over gloo): no warning about the CPU.
    assert "deepspeed on CPU" not in problems
    code, report = doctor_json(QUICKSTART, "hardware.sharding=zero3", "hardware.processes=2")
    problems = by_name(report["plan"]["incompatibilities"])
    assert code == 2 and "hardware.sharding: zero3" in problems["deepspeed"]["detail"]


@needs_planner
def test_memory_per_process_under_each_sharding_marks_the_configured_one() -> None:
    env = gpu_machine()
    cfg = load_config(
        QWEN, ["sft.method=full", "model.load_in_4bit=false", "dpo.method=full", "hardware.sharding=zero2"]
    )
    mem = config_report(cfg, env=env)["stages"]["sft"]["memory"]
    by = mem["by_sharding"]
    assert [k for k, row in by.items() if row["configured"]] == ["zero2"]
    assert by["zero2"]["total_bytes"] == mem["total_bytes"]
    state = {k: row["model_state_bytes"] for k, row in by.items()}
    assert state["zero3"] < state["zero2"] < state["ddp"] and state["fsdp"] < state["zero2"]
    assert len({row["activations_bytes"] for row in by.values()}) == 1  # per process under every engine
    lines = doctor._memory_lines(mem)
    assert any(line.strip().startswith("zero2") and line.endswith("<- configured") for line in lines)
    assert any(line.strip().startswith("fsdp") for line in lines)


def test_qlora_with_fsdp_needs_bf16_storage_and_fsdp_plan_names_the_layer_class() -> None:
    env = gpu_machine()
    cfg = load_config(QWEN, ["hardware.sharding=fsdp"])
    report = config_report(cfg, env=env)
    problems = by_name(report["incompatibilities"])
    assert problems["sharding"]["blocking"]
    assert problems["sharding"]["fix"].startswith("set model.bnb_4bit_quant_storage: bfloat16")
    assert "Qwen3DecoderLayer" in report["target"]["sharding_plan"]
    fixed = config_report(
        load_config(QWEN, ["hardware.sharding=fsdp", "model.bnb_4bit_quant_storage=bfloat16"]), env=env
    )
    assert "sharding" not in by_name(fixed["incompatibilities"])


def test_sharding_with_one_process_warns() -> None:
    code, report = doctor_json(QUICKSTART, "hardware.sharding=fsdp")
    problems = by_name(report["plan"]["incompatibilities"])
    assert problems["sharding"]["status"] == "warn" and "nothing to shard" in problems["sharding"]["detail"]


def test_missing_data_file_blocks_with_the_path() -> None:
    code, text = doctor_text(QUICKSTART, "data.sft.train=data/nope.jsonl")
    assert code == 2 and "data/nope.jsonl" in text and "not found" in text
    assert "point data.sft.train at your files" in text


# --------------------------------------------------------------------------- plans for GPU machines


def test_on_a_gpu_node_auto_picks_flash_attention_when_it_runs() -> None:
    cfg = load_config(QWEN)
    report = config_report(cfg, env=gpu_machine())
    sft = report["stages"]["sft"]
    assert sft["attention"]["value"] == "flash_attention_2" and "runs here" in sft["attention"]["reason"]
    assert sft["dtype"]["reason"] == "auto: the GPUs here support bf16"
    blocking = [c["name"] for c in report["incompatibilities"] if c["blocking"]]
    assert not any(name.startswith(("qlora", "flash", "bf16", "multi-GPU")) for name in blocking)


def test_broken_flash_attn_falls_back_to_sdpa_and_blocks_only_when_requested() -> None:
    broken = gpu_machine(flash_attn=("fail", "ABI mismatch (built for another torch/CUDA): undefined symbol"))
    cfg = load_config(QWEN)
    assert config_report(cfg, env=broken)["stages"]["sft"]["attention"]["value"] == "sdpa"
    cfg = load_config(QWEN, ["model.attn_implementation=flash_attention_2"])
    problem = by_name(config_report(cfg, env=broken)["incompatibilities"])["flash_attention_2"]
    assert problem["blocking"] and "attn_implementation: auto" in problem["fix"]


def test_bf16_requested_on_a_gpu_without_bf16_blocks() -> None:
    t4 = gpu_machine(gpus=[GPU("Tesla T4", 15.0, False, "7.5")], smi_gpus=["Tesla T4"])
    cfg = load_config(QWEN, ["model.dtype=bfloat16", "hardware.gpus=1", "hardware.gpu_memory_gb=16"])
    problem = by_name(config_report(cfg, env=t4)["incompatibilities"])["bf16 on this GPU"]
    assert problem["blocking"] and "float16" in problem["fix"]
    auto = config_report(load_config(QWEN, ["hardware.gpus=1"]), env=t4)
    assert auto["stages"]["sft"]["dtype"]["value"] == "float16"


def test_multi_gpu_without_nccl_blocks() -> None:
    problem = by_name(config_report(load_config(QWEN), env=gpu_machine(nccl=None))["incompatibilities"])
    assert problem["multi-GPU without NCCL"]["blocking"]


def test_qlora_with_a_cpu_only_bitsandbytes_blocks_on_a_gpu() -> None:
    env = gpu_machine(bitsandbytes=("ok", "0.48.0: native library loads (CPU only)"), bnb_cuda=False)
    problems = by_name(config_report(load_config(QWEN), env=env)["incompatibilities"])
    assert problems["qlora without bitsandbytes"]["blocking"]


def test_dpo_checkpointing_under_ddp_with_lora_warns() -> None:
    cfg = load_config(QWEN, ["dpo.gradient_checkpointing=true"])
    problems = by_name(config_report(cfg, env=gpu_machine())["incompatibilities"])
    problem = problems["dpo checkpointing under DDP"]
    assert problem["status"] == "warn" and not problem["blocking"]
