"""`plan.resolve_plan`: one pure rule for attention, dtype / bf16 autocast, quantization, device map and
process count. Machines are described as `Machine` values (what a probe would return there), so GPU
nodes are planned on this CPU machine without patching anything."""

from __future__ import annotations

from pathlib import Path

import yaml

from tunepipe import doctor, planner
from tunepipe.config import load_config
from tunepipe.doctor import GPU, Environment
from tunepipe.plan import Machine, resolve_plan

H100 = Machine(
    "cuda",
    "CUDA GPU here",
    gpus=4,
    gpu_name="NVIDIA H100 80GB HBM3",
    gpu_memory_gb=79.1,
    gpu_bf16=True,
    flash_attn=True,
    flash_attn_why="2.8.3: flash-attn imports and runs",
    bnb_4bit=True,
    processes=4,
)
CPU_BF16 = Machine("cpu", "no CUDA GPU here", cpu_bf16=True)


def _cfg(tmp_path: Path, **sections: object):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(sections))
    return load_config(path)


def test_gpu_with_flash_attn_picks_flash_attention_2_and_bf16(tmp_path: Path) -> None:
    plan = resolve_plan(_cfg(tmp_path), H100)
    assert plan.device == "cuda" and plan.attn_implementation == "flash_attention_2"
    assert "runs here" in plan.attn_reason
    assert plan.dtype == "bfloat16" and plan.bf16_autocast is False
    assert plan.dtype_reason == "auto: the GPUs here support bf16"
    # 4 processes: each owns its whole model on its own GPU.
    assert plan.processes == 4 and plan.device_map == "local_rank"
    assert plan.device_map_reason.startswith("4 processes (ddp)")


def test_gpu_without_working_flash_attn_or_bf16_falls_back(tmp_path: Path) -> None:
    t4 = Machine("cuda", "CUDA GPU here", gpus=1, gpu_bf16=False, flash_attn=False, flash_attn_why="E")
    plan = resolve_plan(_cfg(tmp_path), t4)
    assert plan.attn_implementation == "sdpa" and plan.attn_reason == "flash-attn not usable here (E)"
    assert plan.dtype == "float16" and "lack bf16" in plan.dtype_reason
    assert plan.device_map == "none" and plan.processes == 1  # one GPU, no quantization
    unknown = Machine("cuda", "hardware.gpus: 8", gpus=8)  # the target's GPUs are elsewhere
    plan = resolve_plan(_cfg(tmp_path), unknown)
    assert plan.attn_implementation == "sdpa" and "could not be probed" in plan.attn_reason
    assert plan.dtype == "bfloat16" and "assumed Ampere" in plan.dtype_reason


def test_cpu_with_bf16_keeps_fp32_weights_with_autocast(tmp_path: Path) -> None:
    plan = resolve_plan(_cfg(tmp_path), CPU_BF16)
    assert plan.device == "cpu" and plan.attn_implementation == "sdpa"
    assert plan.attn_reason == "no CUDA GPU here: flash-attn needs a CUDA GPU"
    assert plan.dtype == "float32" and plan.bf16_autocast is True and "bf16 autocast" in plan.reason
    without = resolve_plan(_cfg(tmp_path), Machine("cpu", "no CUDA GPU here", cpu_bf16=False))
    assert without.dtype == "float32" and without.bf16_autocast is False
    assert "bf16 autocast" not in without.reason
    # Several CPU processes: no device map, each holds its whole model in RAM.
    many = Machine("cpu", "no CUDA GPU here", cpu_bf16=True, processes=2)
    assert resolve_plan(_cfg(tmp_path), many).device_map == "none"


def test_a_set_dtype_and_attention_win(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, model={"dtype": "float32", "attn_implementation": "eager"})
    for machine in (H100, CPU_BF16):
        plan = resolve_plan(cfg, machine)
        assert plan.dtype == "float32" and plan.bf16_autocast is False  # fp32 throughout, no autocast
        assert plan.dtype_reason == "set in model.dtype"
        assert plan.attn_implementation == "eager" and plan.attn_reason == "set in model.attn_implementation"


def test_4bit_on_a_gpu_loads_on_the_local_gpu_with_ddp_or_without(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, model={"load_in_4bit": True}, sft={"method": "qlora"}, dpo={"method": "qlora"})
    ddp = resolve_plan(cfg, H100)
    assert ddp.device_map == "local_rank" and "4-bit NF4" in ddp.quantization
    one = resolve_plan(cfg, Machine("cuda", "CUDA GPU here", gpus=1, gpu_bf16=True, bnb_4bit=True))
    assert (
        one.device_map == "local_rank" and one.device_map_reason == "4-bit weights load straight onto the GPU"
    )
    assert one.four_bit_problem is None
    broken = Machine("cpu", "no CUDA GPU here", bnb_4bit=False, bnb_4bit_why="bitsandbytes is not installed")
    assert resolve_plan(cfg, broken).four_bit_problem == "bitsandbytes is not installed"
    assert resolve_plan(_cfg(tmp_path), broken).four_bit_problem is None  # no 4-bit, no problem


def test_target_combines_the_config_with_what_this_machine_knows(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, hardware={"gpus": 8, "gpu_memory_gb": 80, "nodes": 2})
    laptop = Machine(
        "cpu", "no CUDA GPU here", cpu_bf16=True, flash_attn=False, flash_attn_why="not installed"
    )
    target = Machine.target(cfg, laptop)
    assert (target.device, target.gpus, target.processes, target.nodes) == ("cuda", 8, 8, 2)
    assert target.gpu_bf16 is None and target.flash_attn is None  # the GPUs are not here
    assert resolve_plan(cfg, target).processes == 16
    node = Machine.target(cfg, H100)  # planned on a GPU node: its GPUs' bf16 and flash-attn count
    assert node.gpu_bf16 is True and node.flash_attn is True and node.gpu_memory_gb == 80
    cpu = Machine.target(_cfg(tmp_path, hardware={"processes": 3}), H100)
    assert cpu.device == "cpu" and cpu.processes == 3 and cpu.device_why == "CPU target (hardware.gpus: 0)"


def test_doctor_and_planner_give_the_same_answer_for_the_same_machine(tmp_path: Path) -> None:
    """Doctor's resolved plan and the planner's precision both come from resolve_plan on the target."""
    cfg = _cfg(tmp_path)
    env = Environment(
        torch_version="2.13.0",
        torch_cuda=None,
        cuda_available=False,
        driver=None,
        driver_cuda=None,
        smi_gpus=[],
        gpus=[],
        nccl=None,
        flash_attn=("skip", "not installed"),
        bitsandbytes=("ok", "0.48.0"),
        bnb_cuda=False,
        deepspeed=("skip", "not installed"),
        cpu_bf16=doctor.probe_environment().cpu_bf16,  # the planner sizes for this CPU
        ram_gb=64.0,
    )
    want = resolve_plan(cfg, Machine.target(cfg, doctor.machine_here(env)))
    report = doctor.config_report(cfg, env=env)["stages"]["sft"]
    assert report["attention"] == {"value": want.attn_implementation, "reason": want.attn_reason}
    assert report["dtype"]["value"] == want.dtype and report["dtype"]["reason"] == want.dtype_reason
    assert (report["dtype"]["autocast"] == "bfloat16") is want.bf16_autocast
    assert report["quantization"] == want.quantization
    setup = planner._setup(cfg, "sft", None, None)
    assert setup.autocast is want.bf16_autocast and setup.world_size == want.processes
    assert setup.weights_bytes_per_param == (4.0 if want.dtype == "float32" else 2.0)
    # A 4-GPU target planned from a described GPU node: the same plan in doctor as from resolve_plan.
    gpu_cfg = _cfg(tmp_path, hardware={"gpus": 4, "gpu_memory_gb": 80})
    node = Environment(
        **{
            **env.__dict__,
            "cuda_available": True,
            "gpus": [GPU("NVIDIA H100 80GB HBM3", 79.1, True, "9.0")] * 4,
            "flash_attn": ("ok", "2.8.3: flash-attn imports and runs"),
        }
    )
    report = doctor.config_report(gpu_cfg, env=node)["stages"]["sft"]
    want = resolve_plan(gpu_cfg, Machine.target(gpu_cfg, H100))
    assert report["attention"]["value"] == want.attn_implementation == "flash_attention_2"
    assert report["device_map"] == {"value": '{"": local_rank}', "reason": want.device_map_reason}
    assert planner._setup(gpu_cfg, "sft", None, None).world_size == want.processes == 4
