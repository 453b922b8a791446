"""`tunepipe doctor`: the preflight. Owns the checks of this machine (Python, torch and its CUDA build
against the driver, GPUs, flash-attn, bitsandbytes, DeepSpeed, NCCL, library versions against the
tested range, disk, hub cache) and the resolved plan of a config for its target hardware (attention,
dtype, quantization, device map, checkpointing, effective batch, memory and time estimates), with
every problem's one-line fix and whether it blocks a run.

The config describes the hardware a run is planned for (`hardware.gpus`), which need not be this
machine: the checks say what this machine has, the plan says what the target will do. Attention,
dtype, quantization and device map are `plan.resolve_plan` on `Machine.target` (the same rule training
uses on this machine); this module only shows them. Nothing here loads model weights; the checks take
a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from . import sharding, trackers
from .config import Config, ConfigError, load_config
from .modeling import BNB_INSTALL
from .plan import Machine, Plan, resolve_plan
from .preflight import Check, hub_offline, preflight_checks

Status = Literal["ok", "warn", "fail", "skip"]
EXIT_OK, EXIT_BLOCKED = 0, 2
GB = 1024**3

# The libraries whose versions matter most: checked against the ranges tunepipe supports (its own
# requirements, pyproject.toml) and the exact versions it is tested with (constraints.txt).
VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")

# Free space below which the run folder is a problem: checkpoints, prepared data, exports.
DISK_WARN_GB, DISK_FAIL_GB = 20.0, 1.0


# --------------------------------------------------------------------------- this machine


@dataclass
class GPU:
    name: str
    memory_gb: float
    bf16: bool
    capability: str  # "9.0"


@dataclass
class Environment:
    """What this machine has; probed once, read by the checks and by the plan."""

    torch_version: str | None
    torch_cuda: str | None  # the CUDA version torch was built for; None = CPU build
    cuda_available: bool
    driver: str | None  # NVIDIA driver version (nvidia-smi)
    driver_cuda: str | None  # the newest CUDA the driver supports
    smi_gpus: list[str]  # GPU names nvidia-smi sees (even when torch cannot use them)
    gpus: list[GPU]  # GPUs torch can use
    nccl: str | None  # NCCL version, None when not available
    flash_attn: tuple[Status, str]  # probe result
    bitsandbytes: tuple[Status, str]
    bnb_cuda: bool  # bitsandbytes' native library loads with CUDA support
    deepspeed: tuple[Status, str]
    cpu_bf16: bool
    ram_gb: float | None
    packages: dict[str, str | None] = field(default_factory=dict)
    bnb_cpu: bool = False  # bitsandbytes' NF4 layers run on this CPU (probed with one tiny layer)


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _nvidia_smi() -> tuple[str | None, str | None, list[str]]:
    """(driver version, driver CUDA version, GPU names); all empty when there is no NVIDIA driver."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None, None, []
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=10).stdout
        names = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None, []
    driver = re.search(r"Driver Version:\s*([\d.]+)", out)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", out)
    return (
        driver.group(1) if driver else None,
        cuda.group(1) if cuda else None,
        [n.strip() for n in names.splitlines() if n.strip()],
    )


def _probe_flash_attn(cuda: bool) -> tuple[Status, str]:
    if not _installed("flash_attn"):
        return "skip", "not installed"
    try:
        import flash_attn  # type: ignore[import-not-found]  # noqa: F401
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]  # noqa: F401
    except Exception as e:  # an undefined symbol here is a wheel built for another torch / CUDA
        abi = "undefined symbol" in str(e)
        return "fail", ("ABI mismatch (built for another torch/CUDA): " if abi else "does not import: ") + (
            _first_line(e)
        )
    if not cuda:
        return "skip", f"{_pkg_version('flash-attn') or '?'} imports; no CUDA GPU here to probe a call"
    from .modeling import flash_attn_usable

    ok, why = flash_attn_usable()
    return ("ok", f"{_pkg_version('flash-attn') or '?'}: {why}") if ok else ("fail", why)


def _probe_bitsandbytes() -> tuple[Status, str, bool, bool]:
    """(status, detail, the CUDA library loads, NF4 layers run on the CPU). Only QLoRA
    (model.load_in_4bit) needs bitsandbytes: a problem here blocks only the configs that use it."""
    from .modeling import bnb_4bit_on_cpu, bnb_version_problem

    if not _installed("bitsandbytes"):
        return "warn", "not installed: QLoRA (model.load_in_4bit) cannot run", False, False
    v = _pkg_version("bitsandbytes") or "?"
    if bnb_version_problem():
        old = f"{v}: older than 0.46.1 (4-bit on the CPU; the oldest transformers 5 loads): QLoRA cannot run"
        return "warn", old, False, False
    try:
        import bitsandbytes  # type: ignore[import-not-found]  # noqa: F401
        from bitsandbytes.cextension import lib  # type: ignore[import-not-found]
    except Exception as e:
        return "fail", f"does not import: {_first_line(e)}", False, False
    kind = type(lib).__name__
    native = lib is not None and "Mock" not in kind and "ErrorHandler" not in kind
    cuda = native and bool(getattr(lib, "compiled_with_cuda", False))
    cpu, cpu_why = bnb_4bit_on_cpu()
    if cuda:
        return (
            "ok",
            f"{v}: native library loads (CUDA)" + ("; NF4 layers run on the CPU too" if cpu else ""),
            True,
            cpu,
        )
    if cpu:
        return "ok", f"{v}: NF4 layers run on the CPU (no CUDA library here)", False, True
    if not native:
        return (
            "fail",
            f"{v}: imports, but its native library did not load (python -m bitsandbytes)",
            False,
            False,
        )
    return "fail", f"{v}: {cpu_why.removeprefix(f'bitsandbytes {v}: ')}", False, False


def _probe_deepspeed() -> tuple[Status, str]:
    if not _installed("deepspeed"):
        return "skip", "not installed (needed only with hardware.deepspeed)"
    try:
        from deepspeed.git_version_info import (  # type: ignore[import-not-found]
            compatible_ops,
            installed_ops,
        )
    except Exception as e:
        return "fail", f"does not import: {_first_line(e)}"
    built = sorted(k for k, v in installed_ops.items() if v)
    jit = bool(shutil.which("nvcc") or os.environ.get("CUDA_HOME")) and bool(shutil.which("ninja"))
    v = _pkg_version("deepspeed") or "?"
    compatible = sum(1 for ok in compatible_ops.values() if ok)
    if built:
        return "ok", f"{v}: prebuilt ops {', '.join(built)}"
    if jit:
        return "ok", f"{v}: no prebuilt ops; {compatible} can be JIT-compiled (nvcc and ninja found)"
    return "warn", f"{v}: no prebuilt ops and no nvcc/ninja to JIT-compile them (fused/offload optimizers)"


def _ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        return None


def probe_environment() -> Environment:
    """Look at this machine. A few seconds: imports, nvidia-smi, one flash-attn call on a GPU."""
    from .modeling import cpu_supports_bf16

    torch_version = _pkg_version("torch")
    torch_cuda, cuda, gpus, nccl = None, False, [], None
    try:
        import torch

        torch_cuda = torch.version.cuda
        cuda = torch.cuda.is_available()
        for i in range(torch.cuda.device_count() if cuda else 0):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                GPU(
                    name=props.name,
                    memory_gb=round(props.total_memory / GB, 1),
                    bf16=(props.major, props.minor) >= (8, 0),
                    capability=f"{props.major}.{props.minor}",
                )
            )
        if cuda and torch.distributed.is_available() and torch.distributed.is_nccl_available():
            nccl = ".".join(str(x) for x in torch.cuda.nccl.version())
    except ImportError:
        pass
    driver, driver_cuda, smi_gpus = _nvidia_smi()
    bnb_status, bnb_detail, bnb_cuda, bnb_cpu = _probe_bitsandbytes()
    return Environment(
        torch_version=torch_version,
        torch_cuda=torch_cuda,
        cuda_available=cuda,
        driver=driver,
        driver_cuda=driver_cuda,
        smi_gpus=smi_gpus,
        gpus=gpus,
        nccl=nccl,
        flash_attn=_probe_flash_attn(cuda),
        bitsandbytes=(bnb_status, bnb_detail),
        bnb_cuda=bnb_cuda,
        bnb_cpu=bnb_cpu,
        deepspeed=_probe_deepspeed(),
        cpu_bf16=cpu_supports_bf16(),
        ram_gb=_ram_gb(),
        packages={p: _pkg_version(p) for p in VERSIONED},
    )


def _vtuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def supported_ranges() -> dict[str, str]:
    """{package: version specifier} from tunepipe's installed requirements (pyproject.toml)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    out = {}
    for line in requires("tunepipe") or []:
        req = Requirement(line)
        if req.marker is None and req.name in VERSIONED:
            out[req.name] = str(req.specifier)
    return out


def tested_versions() -> dict[str, str]:
    """{package: version} pinned in constraints.txt: what `make install` and CI install."""
    from importlib.resources import files

    out = {}
    for line in (files("tunepipe") / "constraints.txt").read_text(encoding="utf-8").splitlines():
        name, sep, ver = line.split("#")[0].strip().partition("==")
        if sep:
            out[name.strip().lower().replace("_", "-")] = ver.strip()
    return out


def _version_check(name: str, installed: str | None) -> Check:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    spec_text = supported_ranges().get(name, "")
    pinned = tested_versions().get(name)
    spec = SpecifierSet(spec_text)
    want = f"{name}{spec_text}" if spec_text else name
    fix_pin = f"pip install '{name}=={pinned}'" if pinned else f"pip install '{want}'"
    if installed is None:
        return Check(name, "fail", "not installed", fix_pin, blocking=True)
    tested = f"supported {spec_text or 'any'}" + (f", tested with {pinned}" if pinned else "")
    try:
        v = Version(installed)
    except InvalidVersion:
        return Check(name, "warn", f"{installed}: not a version number ({tested})", fix_pin)
    if not spec.contains(v, prereleases=True):
        lower = [s for s in spec if s.operator in (">=", ">", "~=", "==")]
        if any(not s.contains(v, prereleases=True) for s in lower):
            return Check(
                name, "fail", f"{installed} is older than {tested}", f"pip install -U '{want}'", True
            )
        return Check(
            name,
            "warn",
            f"{installed} is newer than the {tested}",
            f"if a stage fails with an unexpected keyword or import error: {fix_pin}",
        )
    same = pinned is None or Version(pinned).release == v.release
    return Check(name, "ok", f"{installed} ({tested}" + ("" if same else "; `make install` pins it") + ")")


def _torch_checks(env: Environment) -> list[Check]:
    if env.torch_version is None:
        return [Check("torch", "fail", "not installed", "pip install -e . (installs the pinned torch)", True)]
    build = f"CUDA {env.torch_cuda} build" if env.torch_cuda else "CPU build"
    checks = [_version_check("torch", env.torch_version)]
    checks[0].detail = checks[0].detail.replace(env.torch_version, f"{env.torch_version}, {build}", 1)
    cuda_index = "pip install torch --index-url https://download.pytorch.org/whl/cu128"
    if env.smi_gpus and not env.torch_cuda:
        checks.append(
            Check(
                "torch CUDA",
                "fail",
                f"torch is a CPU build but nvidia-smi sees {len(env.smi_gpus)} GPU(s)",
                f"install a CUDA build of torch: {cuda_index}",
                blocking=True,
            )
        )
    elif env.torch_cuda and env.driver_cuda:
        want, have = _vtuple(env.torch_cuda), _vtuple(env.driver_cuda)
        detail = f"torch built for CUDA {env.torch_cuda}; driver {env.driver} supports CUDA {env.driver_cuda}"
        if want[:1] > have[:1] or (env.smi_gpus and not env.cuda_available):
            checks.append(
                Check(
                    "torch CUDA",
                    "fail",
                    detail + "; torch cannot use the GPUs",
                    f"upgrade the NVIDIA driver, or install torch built for CUDA <= {env.driver_cuda} "
                    "(https://pytorch.org/get-started/previous-versions/)",
                    blocking=True,
                )
            )
        elif want > have:
            checks.append(
                Check(
                    "torch CUDA",
                    "warn",
                    detail + " (runs through minor-version compatibility; JIT kernels may fail)",
                    f"upgrade the NVIDIA driver to one that supports CUDA {env.torch_cuda}",
                )
            )
        else:
            checks.append(Check("torch CUDA", "ok", detail))
    elif env.torch_cuda and not env.smi_gpus:
        checks.append(Check("torch CUDA", "skip", f"CUDA {env.torch_cuda} build; no NVIDIA driver here"))
    return checks


def _gpu_check(env: Environment) -> Check:
    if not env.gpus:
        return Check(
            "gpu",
            "warn",
            "no CUDA GPU on this machine: training here runs on the CPU (fine for small models and "
            "smoke runs; QLoRA's 4-bit layers run on the CPU too, flash-attn needs a GPU)",
            "for GPU training run on a machine with an NVIDIA GPU, its driver and a CUDA build of torch",
        )
    counts: dict[str, int] = {}
    for g in env.gpus:
        key = f"{g.name} {g.memory_gb:.0f} GB (sm {g.capability}, bf16 {'yes' if g.bf16 else 'no'})"
        counts[key] = counts.get(key, 0) + 1
    return Check("gpu", "ok", f"{len(env.gpus)}: " + ", ".join(f"{n}× {k}" for k, n in counts.items()))


def _status_check(name: str, state: tuple[Status, str], fix: str) -> Check:
    status, detail = state
    needs_fix = status in ("warn", "fail") or "not installed" in detail
    return Check(name, status, detail, fix if needs_fix else None)


def _disk_check(output_dir: Path) -> Check:
    probe = output_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free / GB
    except OSError as e:
        return Check("disk", "warn", f"cannot read free space at {probe}: {_first_line(e)}")
    detail = f"{free:.1f} GB free at {output_dir}"
    fix = "free space there or point project.output_dir (or output_dir=...) at a larger disk"
    if free < DISK_FAIL_GB:
        return Check("disk", "fail", detail, fix, blocking=True)
    if free < DISK_WARN_GB:
        return Check("disk", "warn", detail + f" (checkpoints and exports want > {DISK_WARN_GB:.0f} GB)", fix)
    return Check("disk", "ok", detail)


def _hub_check() -> Check:
    try:
        from huggingface_hub import constants
    except ImportError as e:
        return Check("hub cache", "fail", _first_line(e), "pip install huggingface_hub", blocking=True)
    cache = Path(constants.HF_HUB_CACHE)
    if cache.is_dir():
        models = len(list(cache.glob("models--*")))
        state = f"{models} model(s) cached" + ("" if os.access(cache, os.W_OK) else ", NOT writable")
    else:
        state = "does not exist yet"
    mode = "offline (HF_HUB_OFFLINE): only cached models and datasets" if hub_offline() else "online"
    if cache.is_dir() and not os.access(cache, os.W_OK):
        return Check(
            "hub cache",
            "warn",
            f"{cache} ({state}); {mode}",
            "set HF_HOME to a writable folder, or download the model to a local folder and use its path",
        )
    return Check("hub cache", "ok", f"{cache} ({state}); {mode}")


def _checks_of(env: Environment, output_dir: Path) -> list[Check]:
    py = platform.python_version()
    checks = [
        Check("python", "ok", f"{py} ({sys.executable})")
        if sys.version_info >= (3, 11)
        else Check("python", "fail", f"{py}; tunepipe needs 3.11+", "use Python 3.11 or newer", True),
        *_torch_checks(env),
        _gpu_check(env),
        _status_check(
            "flash-attn",
            (
                env.flash_attn[0],
                env.flash_attn[1] + ("" if env.flash_attn[0] == "ok" else "; attention: sdpa"),
            ),
            "pip uninstall -y flash-attn && pip install flash-attn --no-build-isolation "
            "(builds against the installed torch; optional, sdpa works without it)"
            if env.flash_attn[0] == "fail"
            else "optional: pip install flash-attn --no-build-isolation (on a CUDA machine)",
        ),
        _status_check(
            "bitsandbytes",
            env.bitsandbytes,
            f"{BNB_INSTALL.replace('install', 'install -U --force-reinstall', 1)} (a wheel for this "
            "platform; `make install` pins it)"
            if env.bitsandbytes[0] == "fail"
            else f"{BNB_INSTALL} (a tunepipe requirement; `make install` pins it)",
        ),
        _status_check(
            "deepspeed",
            env.deepspeed,
            "pip install ninja and a CUDA toolkit (nvcc), or reinstall with DS_BUILD_OPS=1"
            if env.deepspeed[0] == "warn"
            else "pip install deepspeed (or pip install -e '.[deepspeed]')",
        ),
    ]
    if len(env.gpus) > 1:
        checks.append(
            Check("nccl", "ok", f"NCCL {env.nccl}")
            if env.nccl
            else Check(
                "nccl",
                "fail",
                f"{len(env.gpus)} GPUs but torch has no NCCL: multi-GPU training cannot start",
                "install the official CUDA build of torch (it ships NCCL)",
                blocking=True,
            )
        )
    else:
        checks.append(Check("nccl", "skip", "needed only with more than one GPU"))
    checks += [_version_check(p, env.packages.get(p)) for p in VERSIONED if p != "torch"]
    checks += [_disk_check(output_dir), _hub_check()]
    return checks


def environment_checks(output_dir: Path | None = None, *, env: Environment | None = None) -> list[Check]:
    """The checks of this machine; `output_dir` is where free disk is measured (default: here)."""
    return _checks_of(env or probe_environment(), (output_dir or Path.cwd()).resolve())


# --------------------------------------------------------------------------- the plan of a config


def _processes(cfg: Config) -> int:
    return sharding.world_size(cfg)


def _fmt_gb(n_bytes: float) -> str:
    return f"{n_bytes / GB:.1f} GB"


def _fmt_h(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def machine_here(env: Environment) -> Machine:
    """This machine, as `plan.Machine`, from doctor's probe (so a described GPU node plans like one)."""
    status, detail = env.flash_attn
    if not env.gpus:
        return Machine(
            "cpu",
            "no CUDA GPU here",
            cpu_bf16=env.cpu_bf16,
            flash_attn=False,
            flash_attn_why=detail,
            bnb_4bit=env.bnb_cpu,
            bnb_4bit_why=env.bitsandbytes[1],
        )
    return Machine(
        "cuda",
        "CUDA GPU here",
        gpus=len(env.gpus),
        gpu_name=env.gpus[0].name,
        gpu_memory_gb=min(g.memory_gb for g in env.gpus),
        gpu_bf16=all(g.bf16 for g in env.gpus),
        cpu_bf16=env.cpu_bf16,
        flash_attn=status == "ok",
        flash_attn_why=detail,
        bnb_4bit=env.bnb_cuda,
        bnb_4bit_why=env.bitsandbytes[1],
    )


def target_plan(cfg: Config, env: Environment) -> Plan:
    """The resolved plan of `cfg` on its target hardware, as far as this machine can tell."""
    return resolve_plan(cfg, Machine.target(cfg, machine_here(env)))


def _attention(plan: Plan) -> dict[str, str]:
    return {"value": plan.attn_implementation, "reason": plan.attn_reason}


def _dtype(plan: Plan) -> dict[str, Any]:
    autocast = "bfloat16" if plan.bf16_autocast else None
    return {"value": plan.dtype, "autocast": autocast, "reason": plan.dtype_reason}


def _device_map(plan: Plan) -> dict[str, str]:
    value = '{"": local_rank}' if plan.device_map == "local_rank" else "none"
    return {"value": value, "reason": plan.device_map_reason}


def _checkpointing(cfg: Config, stage: str) -> dict[str, Any]:
    setting = getattr(cfg, stage).gradient_checkpointing
    if setting != "auto":
        on, reason = bool(setting), f"set in {stage}.gradient_checkpointing"
    else:  # the training stage's own policy: only when the memory plan needs it
        from .planner import checkpointing_decision

        on, reason = checkpointing_decision(cfg, stage)  # type: ignore[arg-type]
    value = "on (non-reentrant)" if on else "off"
    return {"value": value, "enabled": on, "reason": reason}


def _kernels(cfg: Config) -> dict[str, Any]:
    """liger-kernel for the target. Whether it is installed is known only for this machine: planning a
    GPU run elsewhere, `auto` is reported as depending on the target's packages."""
    from .modeling import liger_decision

    installed = _installed("liger_kernel")
    on, why = liger_decision(cfg.training.liger_kernel, "cuda" if cfg.hardware.gpus else "cpu", installed)
    if cfg.hardware.gpus and cfg.training.liger_kernel is not False and not installed:
        return {
            "value": "liger where installed",
            "enabled": False,
            "reason": "on at run time when liger-kernel is installed on the GPU machine and knows the "
            "architecture (not installed on this one: pip install liger-kernel)",
        }
    return {"value": "liger" if on else "none", "enabled": on, "reason": why.split(": ", 1)[1]}


def _batch(cfg: Config, stage: str) -> dict[str, int]:
    s = getattr(cfg, stage)
    procs = _processes(cfg)
    return {
        "per_device": s.per_device_train_batch_size,
        "accumulation": s.gradient_accumulation_steps,
        "processes": procs,
        "effective": s.per_device_train_batch_size * s.gradient_accumulation_steps * procs,
    }


def _device_memory_gb(cfg: Config, env: Environment) -> tuple[float | None, str]:
    if cfg.hardware.gpus == 0:
        # CPU processes of one node share its RAM.
        per_node = cfg.hardware.processes or 1
        if per_node > 1 and env.ram_gb:
            return env.ram_gb / per_node, f"RAM/{per_node}"
        return env.ram_gb, "RAM"
    if cfg.hardware.gpu_memory_gb:
        return cfg.hardware.gpu_memory_gb, "GPU"
    if env.gpus:
        return min(g.memory_gb for g in env.gpus), "GPU"
    return None, "GPU"


def _model_shape(cfg: Config) -> tuple[Any, dict[str, Any]]:
    """The planner's model shape (config.json or its built-in table), or None and why not."""
    try:
        from .planner import ModelShape

        shape = ModelShape.from_config(cfg)
    except Exception as e:  # no planner, or a model it cannot size: the plan is printed without estimates
        return None, {"available": False, "reason": _first_line(e)}
    return shape, {
        "available": True,
        "params": shape.n_params,
        "layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "vocab_size": shape.vocab_size,
        "source": shape.source,
    }


def _memory(cfg: Config, stage: str, env: Environment, shape: Any, why_not: str) -> dict[str, Any]:
    if shape is None:
        return {"available": False, "reason": why_not}
    from .planner import estimate_memory, starting_batch

    device = "cuda" if cfg.hardware.gpus > 0 else "cpu"
    try:
        est = estimate_memory(cfg, stage, device=device, shape=shape)  # type: ignore[arg-type]
    except Exception as e:
        return {"available": False, "reason": _first_line(e)}
    capacity, kind = _device_memory_gb(cfg, env)
    out: dict[str, Any] = {
        "available": True,
        "device": device,
        "device_label": est.device_label,
        "total_bytes": est.total_bytes,
        "components": [
            {"component": name, "bytes": getattr(est, name), "note": note}
            for name, _gib, note in est.table()
            if name != "total"
        ],
        "summary": est.summary(),
        "capacity_gb": capacity,
        "capacity_kind": kind,
        "fits": est.fits(capacity) if capacity else None,
        "total_bytes_checkpointing_on": (
            est.total_bytes - est.activations + est.activations_with_checkpointing
        ),
    }
    out["by_sharding"] = _by_sharding(cfg, stage, device, shape, est)
    if out["fits"] is False and capacity:
        batch, accum = starting_batch(cfg, stage, int(capacity * GB), device=device)  # type: ignore[arg-type]
        one = estimate_memory(cfg, stage, device=device, batch=1, shape=shape)  # type: ignore[arg-type]
        out["fits_at_batch"] = {"batch": batch, "accumulation": accum} if one.fits(capacity) else None
    return out


def _by_sharding(cfg: Config, stage: str, device: str, shape: Any, configured: Any) -> dict[str, Any]:
    """The per-process estimate under each sharding choice at the configured world size."""
    from .planner import compare_sharding

    out = {}
    for kind, e in compare_sharding(cfg, stage, device=device, shape=shape).items():  # type: ignore[arg-type]
        mine = kind == configured.sharding or (kind == "zero2" and configured.sharding == "zero1")
        e = configured if mine else e  # the configured one exactly as planned (its JSON's offload)
        out[kind] = {
            "total_bytes": e.total_bytes,
            "model_state_bytes": e.model_state_bytes,
            "gathered_bytes": e.gathered + e.buffers,
            "activations_bytes": e.activations + e.logits,
            "configured": mine,
        }
    return out


def _time(cfg: Config, stage: str, shape: Any, why_not: str) -> dict[str, Any]:
    from .planner import estimate_time, stage_budget_seconds

    budget = stage_budget_seconds(cfg, stage)  # type: ignore[arg-type]
    out: dict[str, Any] = {"budget_s": budget, "time_limit": cfg.hardware.time_limit}
    if shape is None:
        return {**out, "available": False, "reason": why_not}

    device = "cuda" if cfg.hardware.gpus > 0 else "cpu"
    try:
        est = estimate_time(cfg, stage, device=device, shape=shape)  # type: ignore[arg-type]
    except Exception as e:
        return {**out, "available": False, "reason": _first_line(e)}
    out.update(
        available=est.seconds is not None,
        seconds=est.seconds,
        budget_s=est.budget_seconds,
        fits=est.fits,
        steps=est.steps,
        tokens=est.tokens,
        device_label=est.device_label,
        assumptions=list(est.assumptions),
        summary=est.summary(),
    )
    if est.seconds is None:
        # Without the data size, time one optimizer step and say how many fit in the budget.
        s = getattr(cfg, stage)
        per_step = s.per_device_train_batch_size * s.gradient_accumulation_steps * _processes(cfg)
        one = estimate_time(cfg, stage, device=device, shape=shape, n_examples=per_step)  # type: ignore[arg-type]
        if one.seconds and one.steps:
            out["seconds_per_step"] = one.seconds / one.steps
        out["reason"] = next((a for a in est.assumptions if "unknown" in a), "; ".join(est.assumptions))
    return out


def _blocker(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix, blocking=True)


def _warning(name: str, detail: str, fix: str) -> Check:
    return Check(name, "warn", detail, fix)


def _rule_4bit(cfg: Config, env: Environment) -> list[Check]:
    """QLoRA on this machine's GPUs needs bitsandbytes with its CUDA library. Without a GPU here the
    4-bit layers run on the CPU: the preflight's `qlora on CPU` check probes that (for `run` too)."""
    if not cfg.model.load_in_4bit or not env.cuda_available:
        return []
    if env.bitsandbytes[0] != "ok":
        return [
            _blocker(
                "qlora without bitsandbytes",
                f"model.load_in_4bit needs bitsandbytes: {env.bitsandbytes[1].split(' (')[0]}",
                BNB_INSTALL,
            )
        ]
    if not env.bnb_cuda:
        return [
            _blocker(
                "qlora without bitsandbytes",
                "bitsandbytes loads without CUDA support: 4-bit layers cannot run on the GPU",
                f"{BNB_INSTALL.replace('install', 'install -U --force-reinstall', 1)} (a wheel with "
                "the CUDA library)",
            )
        ]
    return []


def _rule_flash_attention(cfg: Config, env: Environment) -> list[Check]:
    if cfg.model.attn_implementation != "flash_attention_2" or env.flash_attn[0] == "ok":
        return []
    fix = "set model.attn_implementation: auto (sdpa where flash-attn does not work)"
    if cfg.hardware.gpus == 0:
        return [
            _blocker(
                "flash_attention_2 on CPU", "flash_attention_2 needs a CUDA GPU; hardware.gpus is 0", fix
            )
        ]
    detail = f"model.attn_implementation: flash_attention_2, but flash-attn {env.flash_attn[1]}"
    if env.cuda_available:
        return [_blocker("flash_attention_2", detail, fix + ", or reinstall flash-attn for this torch")]
    return [_warning("flash_attention_2", detail + " (no GPU here: check it on the target)", fix)]


def _rule_liger(cfg: Config, env: Environment) -> list[Check]:
    """training.liger_kernel: true where it cannot apply (a CPU target): a warning (training runs
    without it). On a GPU target the packages of the GPU machine decide; `_kernels` says so."""
    if cfg.training.liger_kernel is not True or cfg.hardware.gpus:
        return []
    kernels = _kernels(cfg)
    on, why = kernels["enabled"], kernels["reason"]
    if on:
        return []
    return [
        _warning(
            "liger-kernel",
            f"training.liger_kernel: true, but {why}; training runs without it",
            "pip install liger-kernel on the GPU machine, or set training.liger_kernel: auto",
        )
    ]


def _rule_dtype(cfg: Config, env: Environment) -> list[Check]:
    old = next((g for g in env.gpus if not g.bf16), None)
    if cfg.model.dtype == "bfloat16" and old is not None and cfg.hardware.gpus > 0:
        return [
            _blocker(
                "bf16 on this GPU",
                f"model.dtype: bfloat16, but {old.name} (sm {old.capability}) has no bf16",
                "set model.dtype: auto (fp16 on this GPU) or float16",
            )
        ]
    if cfg.model.dtype == "float16" and cfg.hardware.gpus == 0:
        return [
            _warning(
                "fp16 on CPU",
                "model.dtype: float16 on a CPU target: fp16 mixed precision is GPU-only, fp16 on CPU is slow",
                "set model.dtype: auto (fp32, with bf16 autocast where the CPU has it)",
            )
        ]
    return []


def _rule_deepspeed(cfg: Config, env: Environment) -> list[Check]:
    """ZeRO needs the deepspeed package. On CPU it runs too (its CPU accelerator over gloo; no ops are
    compiled for ZeRO with the trainer's torch optimizer): no warning there."""
    r = sharding.resolve(cfg)
    if r.kind != "deepspeed" or env.deepspeed[0] not in ("skip", "fail"):
        return []
    what = f"hardware.deepspeed names {cfg.hardware.deepspeed}" if cfg.hardware.deepspeed else r.source
    return [
        _blocker(
            "deepspeed",
            f"{what} (DeepSpeed ZeRO-{r.zero_stage}), but deepspeed {env.deepspeed[1].split(' (')[0]}",
            "pip install deepspeed (or pip install -e '.[deepspeed]'), or hardware.sharding: ddp / fsdp",
        )
    ]


def _rule_sharding(cfg: Config, env: Environment) -> list[Check]:
    """hardware.sharding choices that run but not as one may expect (sharding.advice). Those that cannot
    train (sharding.check) are preflight's, shown below with the run's other preflight checks."""
    return [_warning(a.name, a.detail, a.fix) for a in sharding.advice(cfg)]


def _rule_gpus(cfg: Config, env: Environment) -> list[Check]:
    hw, procs, out = cfg.hardware, _processes(cfg), []
    if procs > 1 and hw.gpus > 0 and len(env.gpus) > 1 and not env.nccl:
        out.append(
            _blocker(
                "multi-GPU without NCCL",
                f"the plan runs {procs} processes but torch here has no NCCL",
                "install the official CUDA build of torch (it ships NCCL)",
            )
        )
    elif procs > 1 and hw.gpus > 0 and len(env.gpus) <= 1:
        out.append(
            Check(
                "nccl",
                "skip",
                f"the plan runs {procs} GPU processes; NCCL cannot be checked with {len(env.gpus)} GPU(s)",
                "on the target: python -c 'import torch; print(torch.cuda.nccl.version())'",
            )
        )
    if env.gpus and hw.gpus > len(env.gpus):
        out.append(
            _warning(
                "gpu count",
                f"hardware.gpus is {hw.gpus} but this machine has {len(env.gpus)}: launched here the "
                "effective batch is smaller than planned",
                f"set hardware.gpus={len(env.gpus)} and raise gradient_accumulation_steps to keep the batch",
            )
        )
    smallest = min((g.memory_gb for g in env.gpus), default=None)
    if smallest and hw.gpus > 0 and hw.gpu_memory_gb and smallest < hw.gpu_memory_gb * 0.95:
        out.append(
            _warning(
                "gpu memory",
                f"hardware.gpu_memory_gb is {hw.gpu_memory_gb:g} but the GPUs here have {smallest:.0f} GB",
                f"set hardware.gpu_memory_gb={smallest:.0f}",
            )
        )
    if hw.gpus > 0 and not hw.gpu_memory_gb and not env.gpus:
        out.append(
            _warning(
                "gpu memory",
                "hardware.gpu_memory_gb is not set: the memory estimate cannot be compared with the GPUs",
                "set hardware.gpu_memory_gb (e.g. 80 for an H100 or A100 80GB)",
            )
        )
    return out


def _rule_checkpointing(cfg: Config, env: Environment) -> list[Check]:
    from .stages import registry

    out = []
    for stage in registry.trained(cfg):
        s = cfg.stage(stage)
        if (
            s.gradient_checkpointing is True
            and s.method in ("lora", "qlora")
            and s.reference_policy() == "adapter"
            and _processes(cfg) > 1
        ):
            out.append(
                _warning(
                    f"{stage} checkpointing under DDP",
                    f"{stage}.gradient_checkpointing: true with LoRA under DDP: the reference pass runs "
                    "through the checkpointed model too (slower; tunepipe uses non-reentrant checkpointing, "
                    "which DDP needs)",
                    f"set {stage}.gradient_checkpointing: auto (on only when the memory plan needs it)",
                )
            )
    return out


def _generation(cfg: Config, env: Environment) -> dict[str, Any]:
    """How a stage that samples completions (GRPO) generates on the target: vLLM colocated on the
    training GPU when it is installed there (use_vllm: auto), transformers otherwise."""
    setting = getattr(cfg.stage("grpo"), "use_vllm", "auto") if "grpo" in cfg.pipeline else "auto"
    here = _installed("vllm")
    if setting is False:
        return {"value": "transformers", "reason": "use_vllm: false"}
    if not cfg.hardware.gpus:
        return {"value": "transformers", "reason": "no GPU in the target: transformers' generate on the CPU"}
    if setting is True or here:
        why = "use_vllm: true" if setting is True else "use_vllm: auto and vLLM is installed here"
        return {"value": "vLLM (colocate)", "reason": f"{why}: vLLM on the training GPU"}
    return {
        "value": "transformers (vLLM where installed)",
        "reason": "use_vllm: auto: vLLM colocated on the GPU when installed on the GPU machine "
        "(not here: pip install vllm), transformers' generate otherwise",
    }


# Option combinations that do not work on the target or on this machine, one rule per concern.
RULES: list[Callable[[Config, Environment], list[Check]]] = [
    _rule_4bit,
    _rule_flash_attention,
    _rule_dtype,
    _rule_deepspeed,
    _rule_sharding,
    _rule_gpus,
    _rule_checkpointing,
    _rule_liger,
]


def _estimate_checks(cfg: Config, stages: dict[str, Any]) -> list[Check]:
    """The memory and time estimates against the device memory and the stage's share of the time limit."""
    out = []
    for stage, p in stages.items():
        s = getattr(cfg, stage)
        mem, tm = p["memory"], p["time"]
        if s.enabled and mem.get("available") and mem.get("fits") is False:
            need, where = (
                mem["total_bytes"] / GB,
                f"{mem['capacity_kind']} memory ({mem['capacity_gb']:.0f} GB)",
            )
            batch, smaller = s.per_device_train_batch_size, mem.get("fits_at_batch")
            if smaller:
                out.append(
                    _warning(
                        f"{stage} memory",
                        f"{stage}: ~{need:.1f} GB per device at micro-batch {batch} exceeds {where}; "
                        f"micro-batch {smaller['batch']} fits (the OOM guard would get there by halving)",
                        f"{stage}.per_device_train_batch_size={smaller['batch']} "
                        f"{stage}.gradient_accumulation_steps={smaller['accumulation']} "
                        "(same effective batch)",
                    )
                )
            else:
                out.append(
                    _blocker(
                        f"{stage} memory",
                        f"{stage}: ~{need:.1f} GB per device exceeds {where}, even at batch 1",
                        _memory_fix(cfg, stage, mem),
                    )
                )
        if s.enabled and tm.get("available") and tm.get("fits") is False:
            out.append(
                _warning(
                    f"{stage} time",
                    f"{stage}: ~{_fmt_h(tm['seconds'])} estimated, its share of hardware.time_limit "
                    f"{cfg.hardware.time_limit} is {_fmt_h(tm['budget_s'])}: it would stop early with a "
                    "checkpoint (exit 75)",
                    f"lower {stage}.num_train_epochs or set {stage}.max_steps, or raise hardware.time_limit",
                )
            )
    return out


def _memory_fix(cfg: Config, stage: str, mem: dict[str, Any]) -> str:
    s = getattr(cfg, stage)
    on = mem["total_bytes_checkpointing_on"]
    if not _checkpointing(cfg, stage)["enabled"] and on <= mem["capacity_gb"] * GB * 0.95:
        return f"{stage}.gradient_checkpointing=true (the estimate is then ~{_fmt_gb(on)} per device)"
    options = []
    if s.method in ("full", "freeze"):
        options.append(f"{stage}.method=lora")
    elif s.method == "lora":
        options.append("qlora (model.load_in_4bit=true and method qlora)")
    if not _checkpointing(cfg, stage)["enabled"]:
        options.append(f"{stage}.gradient_checkpointing=true")
    options.append(f"a shorter data.max_length (now {cfg.data.max_length})")
    return "try " + ", ".join(options)


def config_report(cfg: Config, *, env: Environment | None = None) -> dict[str, Any]:
    """The resolved plan for the config's target hardware, per stage, and what does not fit together."""
    env = env or probe_environment()
    hw = cfg.hardware
    plan = target_plan(cfg, env)
    attention, dtype, device_map = _attention(plan), _dtype(plan), _device_map(plan)
    memory = f" {hw.gpu_memory_gb:g} GB" if hw.gpu_memory_gb else ""
    target = f"{hw.gpus}× GPU{memory}" if hw.gpus else "CPU"
    here = f"{len(env.gpus)}× {env.gpus[0].name}" if env.gpus else "no GPU"
    notes = []
    if hw.gpus and not env.gpus:
        notes.append(
            f"this machine has no GPU: the plan below is for the target ({target} × {hw.nodes} node(s)), "
            "not for a run here"
        )
    shape, shape_info = _model_shape(cfg)
    why_not = shape_info.get("reason", "")
    stages: dict[str, Any] = {}
    off = {"available": False, "reason": "stage disabled"}
    from .stages import registry

    for stage in cfg.pipeline:
        s = cfg.stage(stage)
        stages[stage] = {
            "enabled": s.enabled,
            "method": s.method,
            "attention": attention,
            "dtype": dtype,
            "quantization": plan.quantization,
            "device_map": device_map,
            "gradient_checkpointing": _checkpointing(cfg, stage),
            "kernels": _kernels(cfg),
            "batch": _batch(cfg, stage),
            "max_length": cfg.data.max_length,
            "memory": _memory(cfg, stage, env, shape, why_not) if s.enabled else off,
            "time": _time(cfg, stage, shape, why_not) if s.enabled else off,
        }
        if registry.get(stage).generates:
            stages[stage]["generation"] = _generation(cfg, env)
    report: dict[str, Any] = {
        "config": cfg.source,
        "target": {
            "gpus": hw.gpus,
            "gpu_memory_gb": hw.gpu_memory_gb,
            "nodes": hw.nodes,
            "processes": _processes(cfg),
            "sharding": sharding.resolve(cfg).label,
            "sharding_plan": sharding.describe(cfg),
            "deepspeed": hw.deepspeed,
            "time_limit": hw.time_limit,
            "description": target,
        },
        "this_machine": here,
        "notes": notes,
        "model": cfg.model.name_or_path,
        "model_shape": shape_info,
        "output_dir": str(cfg.output_dir),
        # training.report_to: {tracker: where it writes}, with this shell's environment.
        "trackers": trackers.destinations(cfg, "<stage>", cfg.output_dir),
        "stages": stages,
    }
    checks = [
        *(c for rule in RULES for c in rule(cfg, env)),
        *_estimate_checks(cfg, stages),
        # The run's own preflight (the same checks `tunepipe run` makes before its first stage).
        *preflight_checks(cfg, registry.order(cfg), cfg.output_dir, create=False),
    ]
    report["incompatibilities"] = [asdict(c) for c in checks]
    return report


# --------------------------------------------------------------------------- printing


_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "--  "}


def _check_lines(checks: list[Check]) -> list[str]:
    width = max((len(c.name) for c in checks), default=10)
    lines = []
    for c in checks:
        block = " (blocks the run)" if c.blocking else ""
        lines.append(f"  {_MARK[c.status]}  {c.name:<{width}}  {c.detail}{block}")
        if c.fix and c.status in ("warn", "fail", "skip"):
            lines.append(f"        {'':<{width}}  fix: {c.fix}")
    return lines


def _memory_lines(mem: dict[str, Any]) -> list[str]:
    if not mem.get("available"):
        return [f"  memory           estimate unavailable: {mem.get('reason')}"]
    per = "per GPU" if mem["device"] == "cuda" else "in RAM"
    cap = mem.get("capacity_gb")
    verdict = f" ({mem['device_label']})"
    if cap:
        verdict = f" of {cap:.0f} GB{verdict}: " + ("fits" if mem["fits"] else "does NOT fit")
        if mem.get("fits_at_batch"):
            verdict += f" (micro-batch {mem['fits_at_batch']['batch']} fits)"
    lines = [f"  memory {per:<9} ~{_fmt_gb(mem['total_bytes'])}{verdict}"]
    lines += [
        f"      {row['component']:<12} {_fmt_gb(row['bytes']):>9}  {row['note']}".rstrip()
        for row in mem["components"]
        if row["bytes"]
    ]
    by = mem.get("by_sharding") or {}
    if by:
        lines.append(
            "      per process by hardware.sharding (total = model state + gathered/buffers + activations "
            "+ the rest):"
        )
        for kind, row in by.items():
            mark = "  <- configured" if row["configured"] else ""
            lines.append(
                f"        {kind:<6} {_fmt_gb(row['total_bytes']):>9}  (model state "
                f"{_fmt_gb(row['model_state_bytes'])}, gathered/buffers {_fmt_gb(row['gathered_bytes'])}, "
                f"activations {_fmt_gb(row['activations_bytes'])}){mark}"
            )
    return lines


def _time_lines(tm: dict[str, Any]) -> list[str]:
    budget = tm.get("budget_s")
    share = f"{_fmt_h(budget)} share of {tm['time_limit']}" if budget is not None else "no time_limit set"
    if not tm.get("available"):
        lines = [f"  time             total unknown ({tm.get('reason')}); budget: {share}"]
        if tm.get("seconds_per_step"):
            per = tm["seconds_per_step"]
            fit = f": ~{int(budget // per):,} steps fit in the budget" if budget else ""
            lines.append(f"      ~{per:.1f} s per optimizer step{fit}")
            lines += [f"      {a}" for a in tm.get("assumptions", []) if "unknown" not in a]
        return lines
    verdict = "" if tm.get("fits") is None else (": fits" if tm["fits"] else ": over budget")
    steps = f"{tm['steps']:,} steps, {(tm.get('tokens') or 0) / 1e6:.1f}M tokens on {tm['device_label']}"
    return [
        f"  time             ~{_fmt_h(tm['seconds'])} against its {share}{verdict} ({steps})",
        *(f"      {a}" for a in tm.get("assumptions", [])),
    ]


def _shape_text(shape: dict[str, Any]) -> str:
    if not shape.get("available"):
        return f" (size unknown: {shape.get('reason')})"
    size = f"{shape['params'] / 1e9:.2f}B parameters, {shape['layers']} layers"
    return f" ({size}; shape from {shape['source']})"


def _plan_lines(report: dict[str, Any]) -> list[str]:
    t = report["target"]
    extra = f", DeepSpeed {t['deepspeed']}" if t["deepspeed"] else ""
    limit = f", time limit {t['time_limit']}" if t["time_limit"] else ""
    lines = [
        f"Plan for {report['config']}",
        f"  target: {t['description']} × {t['nodes']} node(s) = {t['processes']} process(es){extra}{limit}",
        f"  sharding: {t['sharding_plan']}",
        f"  this machine: {report['this_machine']}",
        *(f"  note: {n}" for n in report["notes"]),
        f"  model: {report['model']}" + _shape_text(report["model_shape"]),
        f"  output_dir: {report['output_dir']}",
        "  trackers: "
        + ("; ".join(f"{k} -> {v}" for k, v in report["trackers"].items()) or "none (training.report_to)"),
    ]
    for stage, p in report["stages"].items():
        if not p["enabled"]:
            lines += ["", f"{stage}: disabled"]
            continue
        b = p["batch"]
        ck = p["gradient_checkpointing"]
        lines += [
            "",
            f"{stage} ({p['method']})",
            f"  attention        {p['attention']['value']}: {p['attention']['reason']}",
            f"  dtype            {p['dtype']['value']}"
            + (f" + {p['dtype']['autocast']} autocast" if p["dtype"]["autocast"] else "")
            + f": {p['dtype']['reason']}",
            f"  quantization     {p['quantization']}",
            f"  device map       {p['device_map']['value']}: {p['device_map']['reason']}",
            f"  checkpointing    {ck['value']}: {ck['reason']}",
            f"  fused kernels    {p['kernels']['value']}: {p['kernels']['reason']}",
            *(
                [f"  generation       {p['generation']['value']}: {p['generation']['reason']}"]
                if "generation" in p
                else []
            ),
            f"  batch            {b['per_device']} per device × {b['accumulation']} accumulation × "
            f"{b['processes']} process(es) = {b['effective']} per optimizer step "
            f"(max_length {p['max_length']})",
            *_memory_lines(p["memory"]),
            *_time_lines(p["time"]),
        ]
    return lines


def _config_error_checks(err: ConfigError) -> list[Check]:
    out = []
    for line in str(err).splitlines():
        if line.startswith("command-line overrides applied"):
            continue
        # Whole-config validators echo the entire config as "(got {...})": noise in a report.
        detail = re.sub(r"\s*\(got \{.*\}\)$", "", line)
        out.append(Check("config", "fail", detail, _config_fix(detail), blocking=True))
    return out


# Fixes for the messages load_config raises, where the message itself does not end with one.
_CONFIG_FIXES = [
    (r"qlora needs model\.load_in_4bit", "set model.load_in_4bit: true, or method: lora"),
    (r"unknown key .* did you mean '([^']+)'", r"rename the key to '\1'"),
    (r"unknown key '([^']+)'", r"remove '\1' (the valid keys are listed)"),
    (r"config file not found", "check the path, or create a project with `tunepipe init DIR`"),
    (r"not valid YAML", "fix the YAML at the line shown"),
]


def _config_fix(line: str) -> str:
    for pattern, fix in _CONFIG_FIXES:
        m = re.search(pattern, line)
        if m:
            return m.expand(fix)
    # Most messages end with the fix after a ';' ("...; use reference: copy or precompute").
    tail = re.split(r";\s+", re.sub(r"\s*\(got .*\)$", "", line))
    if len(tail) > 1:
        return tail[-1]
    return "change the key named above in the config (or override it: section.key=value)"


def run_doctor(config: Path | None, overrides: list[str], as_json: bool, echo: Callable[[str], None]) -> int:
    """Check this machine and, with a config, its plan; print text or JSON; 0 = nothing blocks a run,
    2 = something does (a bad config included)."""
    cfg: Config | None = None
    config_checks: list[Check] = []
    if config is not None or overrides:
        try:
            cfg = load_config(config, overrides)
        except ConfigError as e:
            config_checks = _config_error_checks(e)
    env = probe_environment()
    output_dir = cfg.output_dir if cfg else Path.cwd()
    checks = environment_checks(output_dir, env=env)
    if cfg is not None and cfg.hardware.gpus == 0 and not env.gpus:
        gpu = next(c for c in checks if c.name == "gpu")
        gpu.status, gpu.fix = "ok", None
        gpu.detail = "no GPU; the config plans for CPU (hardware.gpus: 0)"
    report = config_report(cfg, env=env) if cfg is not None else None
    plan_checks = [Check(**c) for c in report["incompatibilities"]] if report else []
    every = checks + config_checks + plan_checks
    blocking = [c for c in every if c.blocking]
    code = EXIT_BLOCKED if blocking else EXIT_OK
    if as_json:
        echo(
            json.dumps(
                {
                    "exit_code": code,
                    "blocking": [c.name for c in blocking],
                    "checks": [asdict(c) for c in checks],
                    "config": str(config) if config else None,
                    "config_errors": [asdict(c) for c in config_checks],
                    "plan": report,
                },
                indent=2,
                default=str,
            )
        )
        return code
    lines = ["This machine", *_check_lines(checks)]
    if config_checks:
        lines += ["", f"Config {config}", *_check_lines(config_checks)]
    if report:
        lines += ["", *_plan_lines(report)]
        if plan_checks:
            lines += ["", "Checks of the config", *_check_lines(plan_checks)]
    problems = [c for c in every if c.status in ("warn", "fail")]
    lines.append("")
    if blocking:
        lines.append(f"{len(blocking)} problem(s) block a run here ({', '.join(c.name for c in blocking)}):")
        lines += [f"  - {c.name}: {c.fix}" for c in blocking]
    elif problems:
        lines.append(f"ready, with {len(problems)} warning(s)")
    else:
        lines.append("ready")
    for line in lines:
        echo(line)
    return code
