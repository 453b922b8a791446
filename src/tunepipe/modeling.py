"""Model and tokenizer loading: quantization, device map, LoRA, fused kernels; and the probes of this
machine that the plan is resolved from (flash-attn, bitsandbytes, CPU bf16).

Which attention kernel, dtype and device map is decided in `plan.resolve_plan` (with the reason for
each, so `doctor` and the logs can say what was picked and why); `plan_for` asks it for this machine.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

from .compat import dtype_kwarg
from .config import Config, ConfigError, ModelConfig, StageTrainingConfig
from .plan import Machine, Plan, resolve_plan
from .plan import resolve_attention as _attention_rule
from .quickstart.model import resolve_model_path


@cache
def cpu_supports_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls are fast; without them bf16 on CPU is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def flash_attn_usable() -> tuple[bool, str]:
    """Import flash_attn and run it once: a wheel built for another torch imports but fails at call time.
    The detail names the version that runs, or what failed."""
    if not cuda_available():
        return False, "no CUDA GPU"
    try:
        import torch
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]

        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        flash_attn_func(q, q, q)
        from .compat import version_tuple

        return True, f"flash-attn {'.'.join(map(str, version_tuple('flash-attn'))) or '?'} runs a call"
    except Exception as e:  # ImportError, undefined symbol (ABI mismatch), unsupported GPU
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


# The first bitsandbytes release whose 4-bit layers run on the CPU is 0.46.0 (torch custom ops with a
# CPU backend; 0.45 quantizes only on CUDA); transformers 5 loads 4-bit models only with 0.46.1 or newer.
BNB_MIN_VERSION = (0, 46, 1)
BNB_INSTALL = "pip install 'bitsandbytes>=0.46.1,<0.51'"  # the range of pyproject.toml


# On CPUs with avx512_bf16, importing bitsandbytes (PEFT and TRL import it when it is installed) tries
# to fetch an optional fused kernel from the hub (the `kernels` package) and logs a warning when it
# cannot; bitsandbytes' own CPU kernel is used instead, so the warning is only noise in every stage log.
# Set before any stage module imports TRL.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def bnb_version_problem() -> str | None:
    """Why the installed bitsandbytes cannot load a 4-bit model at all; None when it can."""
    from .compat import version_tuple

    have = version_tuple("bitsandbytes")
    if not have:
        return "bitsandbytes is not installed"
    if have < BNB_MIN_VERSION:
        return (
            f"bitsandbytes {'.'.join(map(str, have))} is older than 0.46.1, the first release whose 4-bit "
            "layers run on the CPU (and the oldest transformers 5 loads)"
        )
    return None


@cache
def bnb_4bit_on_cpu() -> tuple[bool, str]:
    """Whether bitsandbytes' NF4 layers run on this CPU, and why: installed, new enough, and one tiny
    `Linear4bit` quantizes and runs forward and backward (a native library that did not load fails
    here, not in the middle of a stage). The import takes a few seconds, once per process."""
    problem = bnb_version_problem()
    if problem:
        return False, problem
    from .compat import version_tuple

    shown = ".".join(map(str, version_tuple("bitsandbytes")))
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
        import torch

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to("cpu")  # quantizes the weight
        x = torch.ones(2, 64, requires_grad=True)
        layer(x).sum().backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            return False, f"bitsandbytes {shown}: a 4-bit layer on the CPU gave no usable gradient"
    except Exception as e:  # a native library that did not load, an op without a CPU kernel
        first = str(e).splitlines()[0][:160] if str(e) else ""
        return False, f"bitsandbytes {shown}: a 4-bit layer fails on the CPU ({type(e).__name__}: {first})"
    return True, f"bitsandbytes {shown}: NF4 layers run on the CPU"


def resolve_attention(requested: str) -> tuple[str, str]:
    """The attention kernel for `model.attn_implementation` on this machine, and why."""
    return _attention_rule(requested, Machine.this())


def plan_for(cfg: Config | ModelConfig) -> Plan:
    """The plan on this machine, in this process (its process group from WORLD_SIZE): `resolve_plan`
    with `Machine.this()`. Given only the model section, the hardware section is taken at its defaults
    (only the device map's reason under several processes names the sharding from it)."""
    if isinstance(cfg, ModelConfig):  # no validation: only the model and hardware sections are read
        cfg = Config.model_construct(model=cfg)
    return resolve_plan(cfg, Machine.this(four_bit=cfg.model.load_in_4bit))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def model_path(cfg: Config, log: Any = print) -> str:
    """The embedded alias's folder, a local folder (relative paths from the config's folder, as the
    fingerprint and the preflight read it), or the hub id as written."""
    local = cfg.path(cfg.model.name_or_path)
    if local.is_dir():
        return str(local)
    return resolve_model_path(cfg.model.name_or_path, log=log)


# Templates by name for `model.chat_template`; anything else is a file path or the template text.
NAMED_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


def resolve_chat_template(cfg: Config) -> str:
    value = cfg.model.chat_template or ""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    p = cfg.path(value)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    if "{%" in value or "{{" in value:
        return value
    raise ConfigError(
        f"{cfg.source}: model.chat_template {value!r} is not a file, a template, or a known name "
        f"({', '.join(NAMED_TEMPLATES)})"
    )


def load_tokenizer(cfg: Config, path: str | None = None, log: Any = print) -> Any:
    from transformers import AutoTokenizer

    path = path or model_path(cfg, log)
    tok = AutoTokenizer.from_pretrained(
        path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    if cfg.model.chat_template:
        tok.chat_template = resolve_chat_template(cfg)
    if tok.pad_token is None:
        # Padding is masked out everywhere; reusing EOS is the common, safe choice.
        tok.pad_token = tok.eos_token
    return tok


def liger_decision(setting: str | bool, device: str, installed: bool | None = None) -> tuple[bool, str]:
    """Whether liger-kernel's fused kernels go into the trained model, and why (`training.liger_kernel`)."""
    if setting is False:
        return False, "off: set in training.liger_kernel"
    if device != "cuda":
        return False, "off: liger-kernel's kernels are Triton GPU kernels and this run has no CUDA GPU"
    if installed is None:
        import importlib.util

        installed = importlib.util.find_spec("liger_kernel") is not None
    if not installed:
        return False, "off: liger-kernel is not installed (pip install liger-kernel)"
    return True, "on: liger-kernel RMSNorm, RoPE and SwiGLU kernels (the LM head stays TRL's fused one)"


def apply_fused_kernels(model: Any, cfg: Config, plan: Plan, log: Any = print) -> bool:
    """Patch liger-kernel's kernels into a loaded model before the trainer wraps it (PEFT included);
    returns whether they were applied. A liger-kernel that does not import or has no kernels for this
    architecture is logged and training goes on without it; an error while patching stops the stage
    with liger's message and the setting that avoids it.

    Its fused linear cross-entropy and cross-entropy stay off: TRL's trainers replace the model's
    forward with their own fused LM head, which a liger forward would bypass. liger patches this
    model's norm and MLP modules and, for the whole process, the architecture's RMSNorm and MLP
    classes and rotary-embedding function: later models of that architecture built in this process
    (e.g. the eval stage's) use the kernels too."""
    on, why = liger_decision(cfg.training.liger_kernel, plan.device)
    if cfg.training.liger_kernel is True and not on:
        log(f"training.liger_kernel: true, but {why.removeprefix('off: ')}: training without it")
    if not on:
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as e:  # installed but broken: Triton or transformers of another version
        first = str(e).splitlines()[0][:160] if str(e) else ""
        log(f"kernels: liger-kernel does not import ({type(e).__name__}: {first}); training without it")
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log(f"kernels: liger-kernel has no kernels for model type {model_type!r}; training without them")
        return False
    try:
        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    except Exception as e:
        raise RuntimeError(
            f"liger-kernel failed while patching the {model_type} model ({type(e).__name__}: {e}); "
            "set training.liger_kernel: false to train without it"
        ) from e
    log(f"kernels: {why} for {model_type}")
    return True


def load_kwargs(cfg: Config, plan: Plan, env: dict[str, str] | None = None) -> dict[str, Any]:
    """from_pretrained arguments for this plan; `env` is the process environment (LOCAL_RANK)."""
    import torch

    env = dict(os.environ) if env is None else env
    kwargs: dict[str, Any] = {
        "revision": cfg.model.revision,
        "trust_remote_code": cfg.model.trust_remote_code,
        "attn_implementation": plan.attn_implementation,
        **dtype_kwarg(getattr(torch, plan.dtype)),
    }
    if cfg.model.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, plan.dtype),
            bnb_4bit_quant_storage=getattr(torch, cfg.model.bnb_4bit_quant_storage),
        )
    if plan.device_map == "local_rank":  # why: plan.device_map_reason (plan.resolve_plan decides it)
        kwargs["device_map"] = {"": int(env.get("LOCAL_RANK", "0"))}
    return kwargs


def require_4bit(cfg: Config, plan: Plan) -> None:
    """model.load_in_4bit can load on this plan's device (`Machine.this` probed it: on the CPU one 4-bit
    layer runs; on a GPU transformers checks the CUDA build itself, a missing or too old package is said
    here), or a ConfigError that names the fix."""
    problem = plan.four_bit_problem
    if problem is None:
        return
    raise ConfigError(
        f"{cfg.source}: model.load_in_4bit (QLoRA) cannot run on the {plan.device.upper()} here: {problem}. "
        f"Fix: {BNB_INSTALL}; or model.load_in_4bit: false with method: lora (same adapters, more memory)"
    )


def load_model(cfg: Config, plan: Plan, path: str | None = None, log: Any = print) -> Any:
    from transformers import AutoModelForCausalLM

    if cfg.model.load_in_4bit:
        require_4bit(cfg, plan)
    model = AutoModelForCausalLM.from_pretrained(path or model_path(cfg, log), **load_kwargs(cfg, plan))
    if cfg.model.load_in_4bit:
        log(describe_4bit(model, cfg, plan))
    return model


def describe_4bit(model: Any, cfg: Config, plan: Plan) -> str:
    """One line for the stage log: how many linear layers are 4-bit, with which compute and storage."""
    from .compat import version_tuple

    n = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    where = "CPU" if plan.device == "cpu" else "GPU"
    return (
        f"model: {n} linear layers in 4-bit NF4 (Linear4bit, bitsandbytes "
        f"{'.'.join(map(str, version_tuple('bitsandbytes')))} on the {where}), {plan.dtype} compute, "
        f"{cfg.model.bnb_4bit_quant_storage} storage"
    )


def lora_config(stage_cfg: StageTrainingConfig) -> Any:
    from peft import LoraConfig

    lc = stage_cfg.lora
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def merge_adapter(model: Any, adapter_dir: Path) -> Any:
    """Fold a saved LoRA adapter into the weights: the next stage starts from this model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def uses_lora(stage_cfg: StageTrainingConfig) -> bool:
    return stage_cfg.method in ("lora", "qlora")


def freeze_all_but_last_layers(model: Any, n: int) -> int:
    """method: freeze. Train only the last n decoder layers (and the final norm); returns the
    number of trainable parameters."""
    layers = None
    for _name, module in model.named_modules():
        if type(module).__name__ == "ModuleList" and len(module) > 0 and _name.endswith("layers"):
            layers = module
            break
    if layers is None:
        raise ValueError("method: freeze: no decoder layer list found in this model; use lora or full")
    for p in model.parameters():
        p.requires_grad = False
    keep = list(layers)[-n:]
    norm = getattr(getattr(model, "model", model), "norm", None)
    for module in [*keep, *([norm] if norm is not None else [])]:
        for p in module.parameters():
            p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_stage_model(cfg: Config, plan: Plan, run_dir: Path, which: str, log: Any = print) -> Any:
    """Model `which` (base or a trained stage) as the run folder holds it: a full model folder
    (`<stage>/model`, methods full and freeze) or the base with the stages' adapters merged in
    pipeline order (stages.registry.chain)."""
    from .stages import registry

    chain = registry.chain(cfg, which)
    # Start from the latest stage that saved a whole model; merge the adapters after it.
    start = max(
        (i for i, s in enumerate(chain) if (run_dir / s / "model" / "config.json").is_file()), default=-1
    )
    model = load_model(cfg, plan, str(run_dir / chain[start] / "model") if start >= 0 else None, log=log)
    for stage in chain[start + 1 :]:
        adapter = run_dir / stage / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{adapter}: no adapter; run `tunepipe train CONFIG --stage {stage}` first"
            )
        model = merge_adapter(model, adapter)
    return model
