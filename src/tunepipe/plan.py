"""The resolved plan of a run: attention kernel, weights dtype and bf16 autocast, quantization, device
map and process count, each with the reason for it. One rule, decided here only: `resolve_plan(cfg,
machine)` is pure, everything it knows about the hardware comes from the `Machine` it is given.

`Machine.this()` probes the machine this process runs on (training, eval, export, chat);
`Machine.target(cfg, here)` describes the hardware a config is planned for (`hardware.gpus`,
`gpu_memory_gb`, `nodes`, `processes`) with what can be known on this machine (`doctor`, the planner).
The probes themselves live where they are used for more than planning (modeling: flash-attn,
bitsandbytes, CPU bf16).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from . import sharding
from .config import Config, ModelConfig

Device = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class Machine:
    """The hardware a plan is resolved for. `None` in a probe field means "not known": the GPUs are
    elsewhere (planning for a target from a machine without them), so nothing could be tried."""

    device: Device
    device_why: str  # why this device: "CUDA GPU here", "CPU target (hardware.gpus: 0)", ...
    gpus: int = 0  # per node
    gpu_name: str | None = None
    gpu_memory_gb: float | None = None  # the smallest GPU's
    gpu_bf16: bool | None = None  # every GPU has bf16 (Ampere or newer)
    cpu_bf16: bool = False  # AMX or avx512_bf16: bf16 autocast is faster than fp32 on this CPU
    flash_attn: bool | None = None  # flash-attn imports and runs a call on the GPU
    flash_attn_why: str = ""  # the probe's detail
    bnb_4bit: bool | None = None  # bitsandbytes' 4-bit layers can run on `device`
    bnb_4bit_why: str = ""
    processes: int = 1  # per node
    nodes: int = 1

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes

    @classmethod
    def this(cls, *, four_bit: bool = False, env: Mapping[str, str] | None = None) -> Machine:
        """This machine, as the running process sees it: CUDA or not, its GPUs, flash-attn, CPU bf16,
        and the process group it was launched in (WORLD_SIZE / LOCAL_WORLD_SIZE). bitsandbytes is
        probed only with `four_bit` (a few seconds on the CPU)."""
        from . import modeling  # looked up at call time: the probes are modeling's

        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1"))
        per_node = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        bnb, bnb_why = None, ""
        common = {"processes": per_node, "nodes": max(world // max(per_node, 1), 1)}
        if not modeling.cuda_available():
            if four_bit:
                bnb, bnb_why = modeling.bnb_4bit_on_cpu()
            ok, why = modeling.flash_attn_usable()
            return cls(
                "cpu",
                "no CUDA GPU here",
                cpu_bf16=modeling.cpu_supports_bf16(),
                flash_attn=ok,
                flash_attn_why=why,
                bnb_4bit=bnb,
                bnb_4bit_why=bnb_why,
                **common,
            )
        import torch

        n = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(n)]
        if four_bit:
            problem = modeling.bnb_version_problem()
            bnb, bnb_why = problem is None, problem or "bitsandbytes loads 4-bit models on the GPU"
        ok, why = modeling.flash_attn_usable()
        return cls(
            "cuda",
            "CUDA GPU here",
            gpus=n,
            gpu_name=props[0].name if props else None,
            gpu_memory_gb=min((p.total_memory / 1024**3 for p in props), default=None),
            gpu_bf16=bool(torch.cuda.is_bf16_supported()),
            cpu_bf16=modeling.cpu_supports_bf16(),
            flash_attn=ok,
            flash_attn_why=why,
            bnb_4bit=bnb,
            bnb_4bit_why=bnb_why,
            **common,
        )

    @classmethod
    def target(cls, cfg: Config, here: Machine | None = None, device: Device | None = None) -> Machine:
        """The hardware `cfg` is planned for: cfg.hardware's GPUs, memory, nodes and processes, with
        what `here` (this machine, if known) tells about them: its GPUs' bf16 and flash-attn when it has
        GPUs, its CPU's bf16 for a CPU target. Without `here`, only the CPU's bf16 is probed (the
        planner's memory and time estimates need nothing else). `device` overrides the one
        hardware.gpus implies (a stage sizing itself on the GPU it runs on)."""
        hw = cfg.hardware
        if here is None:
            from . import modeling

            here = cls("cpu", "not probed", cpu_bf16=modeling.cpu_supports_bf16())
        device = device or ("cuda" if hw.gpus > 0 else "cpu")
        common = {
            "cpu_bf16": here.cpu_bf16,
            "processes": sharding.world_size(cfg) // hw.nodes,
            "nodes": hw.nodes,
        }
        if device == "cpu":
            why = "CPU target (hardware.gpus: 0)" if hw.gpus == 0 else "CPU"
            return cls(
                "cpu",
                why,
                flash_attn=False,
                flash_attn_why="the target is the CPU",
                bnb_4bit=here.bnb_4bit if here.device == "cpu" else None,
                bnb_4bit_why=here.bnb_4bit_why if here.device == "cpu" else "",
                **common,
            )
        gpus_here = here.device == "cuda"
        return cls(
            "cuda",
            f"hardware.gpus: {hw.gpus}" if hw.gpus else "a CUDA GPU",
            gpus=hw.gpus,
            gpu_name=here.gpu_name if gpus_here else None,
            gpu_memory_gb=hw.gpu_memory_gb or (here.gpu_memory_gb if gpus_here else None),
            gpu_bf16=here.gpu_bf16 if gpus_here else None,
            flash_attn=here.flash_attn if gpus_here else None,
            flash_attn_why=here.flash_attn_why,
            bnb_4bit=here.bnb_4bit if gpus_here else None,
            bnb_4bit_why=here.bnb_4bit_why if gpus_here else "",
            **common,
        )


@dataclass(frozen=True)
class Plan:
    """What a stage runs with, and why. The first six fields are positional (stages and tests build
    plans by hand); `reason` is the one-line summary for stage logs."""

    device: Device
    attn_implementation: str
    attn_reason: str
    dtype: str  # weights dtype
    bf16_autocast: bool  # mixed precision for training
    reason: str
    dtype_reason: str = ""
    quantization: str = ""  # "none (...)" or the 4-bit scheme
    four_bit_problem: str | None = None  # why model.load_in_4bit cannot load here; None when it can
    device_map: Literal["none", "local_rank"] = "none"  # local_rank: {"": LOCAL_RANK}
    device_map_reason: str = ""
    processes: int = 1  # of the whole run (world size)


def resolve_attention(requested: str, machine: Machine) -> tuple[str, str]:
    if requested != "auto":
        return requested, "set in model.attn_implementation"
    if machine.device == "cpu":
        return "sdpa", f"{machine.device_why}: flash-attn needs a CUDA GPU"
    if machine.flash_attn:
        return "flash_attention_2", f"flash-attn imports and runs here ({machine.flash_attn_why})"
    if machine.flash_attn is None:
        return "sdpa", (
            "the plan is for the target GPUs; flash-attn could not be probed on this machine "
            f"(no GPU; flash-attn {machine.flash_attn_why}), so sdpa is the safe default. `auto` picks "
            "flash_attention_2 at run time where flash-attn imports and runs"
        )
    return "sdpa", f"flash-attn not usable here ({machine.flash_attn_why})"


def resolve_dtype(requested: str, machine: Machine) -> tuple[str, bool, str]:
    """(weights dtype, bf16 autocast, why)."""
    if requested != "auto":  # float32 = fp32 throughout, without bf16 autocast (on the CPU too)
        return requested, False, "set in model.dtype"
    if machine.device == "cpu":
        if machine.cpu_bf16:
            return "float32", True, "auto: this CPU has bf16 (AMX/avx512_bf16): fp32 weights, bf16 autocast"
        return "float32", False, "auto: this CPU has no AMX/avx512_bf16: fp32 (bf16 would be slower here)"
    if machine.gpu_bf16 is None:
        assumed = "assumed Ampere or newer, e.g. A100/H100; fp16 on older"
        return "bfloat16", False, f"auto: bf16 on the target GPUs ({assumed})"
    where = "the GPUs here " + ("support bf16" if machine.gpu_bf16 else "lack bf16 (older than Ampere)")
    return ("bfloat16" if machine.gpu_bf16 else "float16"), False, f"auto: {where}"


def _quantization(model: ModelConfig, dtype: str) -> str:
    if not model.load_in_4bit:
        return f"none ({dtype} weights)"
    storage = model.bnb_4bit_quant_storage
    return f"4-bit NF4 (bitsandbytes), double quantization, {dtype} compute, {storage} storage"


def _device_map(cfg: Config, machine: Machine) -> tuple[Literal["none", "local_rank"], str]:
    procs = machine.world_size
    if machine.device == "cpu":
        # No device map: every process (several over gloo included) loads its whole model, 4-bit or
        # not, into its own memory; transformers quantizes on the CPU when there is no GPU.
        if cfg.model.load_in_4bit:
            return "none", f"{machine.device_why}: each process quantizes and holds its 4-bit model in RAM"
        return "none", f"{machine.device_why}: each process holds its whole model in RAM"
    if cfg.model.load_in_4bit or procs > 1:
        # Under DDP every process must own its whole model copy on its own GPU; device_map="auto"
        # would spread one copy over all GPUs and DDP then fails (or 4-bit loads on the wrong one).
        if procs == 1:
            return "local_rank", "4-bit weights load straight onto the GPU"
        kind = sharding.resolve(cfg).label
        then = ", then it is sharded" if kind in ("fsdp", "zero3") else ": a whole copy per GPU"
        return "local_rank", f"{procs} processes ({kind}): each loads the model onto its own GPU{then}"
    return "none", "one GPU, no quantization: the trainer moves the model to cuda:0"


def resolve_plan(cfg: Config, machine: Machine) -> Plan:
    """The plan of `cfg` on `machine`: pure, the same answer for the same Machine wherever it is asked
    (training with `Machine.this()`, doctor and the planner with `Machine.target(cfg, ...)`)."""
    m = cfg.model
    attn, attn_reason = resolve_attention(m.attn_implementation, machine)
    dtype, autocast, dtype_reason = resolve_dtype(m.dtype, machine)
    device_map, map_reason = _device_map(cfg, machine)
    where = "GPU" if machine.device == "cuda" else "CPU"
    weights = f"{dtype} weights" + (" + bf16 autocast" if autocast else "")
    summary = f"{where}: {weights}, {attn} attention ({dtype_reason})"
    return Plan(
        device=machine.device,
        attn_implementation=attn,
        attn_reason=attn_reason,
        dtype=dtype,
        bf16_autocast=autocast,
        reason=summary,
        dtype_reason=dtype_reason,
        quantization=_quantization(m, dtype),
        four_bit_problem=(machine.bnb_4bit_why or "bitsandbytes not usable")
        if m.load_in_4bit and machine.bnb_4bit is False
        else None,
        device_map=device_map,
        device_map_reason=map_reason,
        processes=machine.world_size,
    )
