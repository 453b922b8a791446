"""How a training stage is spread over its processes (`hardware.sharding`): the extra TrainingArguments
for DDP, FSDP2 (through accelerate) and DeepSpeed ZeRO-2/3, the rules that make a combination unusable,
the decoder-layer class FSDP wraps, and two trainer hooks that FSDP needs.

    ddp     every process holds the whole model; gradients are all-reduced (the default under a
            process group: no extra arguments)
    fsdp    FSDP2 (torch `fully_shard`) through accelerate: weights, gradients and optimizer state
            sharded over the processes, one decoder layer gathered at a time
    zero2   DeepSpeed ZeRO-2: optimizer state and gradients sharded, a whole copy of the weights each
    zero3   DeepSpeed ZeRO-3: weights sharded too
    hardware.deepspeed (a DeepSpeed JSON of yours) replaces the generated ZeRO config; with
    hardware.sharding left at its default, the JSON's stage decides.

Measured on 2 CPU processes over gloo (torch 2.13, transformers 5.24, accelerate 1.15, DeepSpeed 0.19.8;
a tiny Llama/Qwen3, LoRA and full fine-tuning, 5 steps, same seed and data):
    - accelerate has no FSDP on CPU: its state switches to FSDP only for GPU-like distributed types
      (MULTI_GPU, MULTI_NPU, ...), so on MULTI_CPU it drops the plugin and trains plain DDP without a
      word. torch's `fully_shard` itself runs on CPU over gloo; `prepare_trainer` marks accelerate's
      state FSDP so the trainer really shards there (tests, CPU boxes). With it the losses equal DDP's
      (fp32: identical to the last digit; every parameter a DTensor holding half of the values), and
      FULL and SHARDED state-dict checkpoints save and resume to the same losses.
    - DeepSpeed ZeRO-2 and ZeRO-3 run on CPU as they are (DeepSpeed picks its CPU accelerator and
      gloo; no ops are compiled for ZeRO with a torch optimizer): losses equal DDP's in fp32 and lie
      within 5e-4 in bf16; checkpoints resume to the same losses.
    - Under FSDP2 and ZeRO-3 the weights are sharded: `model.save_pretrained` on the main process alone
      fails (FSDP2: "Attempted to access the data pointer on an invalid python storage") or writes
      shards. The final save must be `trainer.save_model()` on every process (`before_final_save` first).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .config import Config

Kind = Literal["ddp", "fsdp", "deepspeed"]

# DeepSpeed configs, the same as configs/deepspeed/zero{2,3}.json in the repository (a test keeps them
# equal): batch, accumulation, clipping and precision are "auto", i.e. the TrainingArguments' values,
# which tunepipe sets from the plan (bf16 where the plan trains in bf16). No "optimizer"/"scheduler"
# block: the trainer's own (training.optim, lr_scheduler_type) is used, as under DDP.
DEEPSPEED: dict[int, dict[str, Any]] = {
    2: {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "allgather_bucket_size": 5e8,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    },
    3: {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # One 16-bit model file at save time instead of per-rank shards only (the adapter/model a
            # stage hands on must be loadable without zero_to_fp32.py).
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    },
}


def deepspeed_config(stage: int) -> dict[str, Any]:
    """A fresh copy of the generated ZeRO-`stage` config (2 or 3)."""
    return copy.deepcopy(DEEPSPEED[stage])


# --------------------------------------------------------------------------- what the config asks for


@dataclass(frozen=True)
class Resolved:
    kind: Kind
    zero_stage: int  # 0 unless DeepSpeed
    offload_optimizer: bool  # DeepSpeed's offload_optimizer (user JSON only)
    source: str  # where the choice came from, for doctor

    @property
    def label(self) -> str:
        return f"zero{self.zero_stage}" if self.kind == "deepspeed" else self.kind


def world_size(cfg: Config) -> int:
    """Processes of the whole run: hardware.processes per node (default one per GPU, 1 on CPU) x nodes."""
    hw = cfg.hardware
    return (hw.processes or max(hw.gpus, 1)) * hw.nodes


def _user_deepspeed(cfg: Config) -> dict[str, Any]:
    """hardware.deepspeed read; raises ValueError with the path and the reason."""
    path = cfg.path(cfg.hardware.deepspeed or "")
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"hardware.deepspeed: cannot read {path}: {e}") from None
    if not isinstance(ds, dict):
        raise ValueError(f"hardware.deepspeed: {path} is not a JSON object")
    return ds


def resolve(cfg: Config) -> Resolved:
    """The engine and ZeRO stage the config asks for. hardware.deepspeed wins for ZeRO: its stage is
    the one that runs; with hardware.sharding at its default (ddp, not written) a JSON alone means
    DeepSpeed at the JSON's stage (configs written before hardware.sharding existed)."""
    hw = cfg.hardware
    explicit = "sharding" in hw.model_fields_set
    if hw.deepspeed and (hw.sharding.startswith("zero") or not explicit):
        try:
            zero = _user_deepspeed(cfg).get("zero_optimization") or {}
        except ValueError:
            zero = {}
        offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        return Resolved(
            "deepspeed", int(zero.get("stage", 0)), offload, f"hardware.deepspeed ({hw.deepspeed})"
        )
    if hw.sharding.startswith("zero"):
        return Resolved("deepspeed", int(hw.sharding[-1]), False, f"hardware.sharding: {hw.sharding}")
    return Resolved(hw.sharding, 0, False, f"hardware.sharding: {hw.sharding}")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the decoder layer class

# By model family, for models not available locally (doctor on a laptop): the class transformers names.
_LAYER_BY_NAME = (
    ("qwen3", "Qwen3DecoderLayer"),
    ("qwen2", "Qwen2DecoderLayer"),
    ("llama", "LlamaDecoderLayer"),
    ("smollm", "LlamaDecoderLayer"),
    ("mistral", "MistralDecoderLayer"),
    ("gemma", "GemmaDecoderLayer"),
    ("phi3", "Phi3DecoderLayer"),
)


def _hf_config(cfg: Config) -> Any | None:
    """The model's transformers config without weights: embedded alias, local folder, or the hub
    cache (offline); None when it is not available here."""
    from transformers import AutoConfig

    from .quickstart.model import MARKER, embedded_model_dir, is_alias

    name = cfg.model.name_or_path
    trust = cfg.model.trust_remote_code
    try:
        if is_alias(name):
            folder = embedded_model_dir(name)
            return AutoConfig.from_pretrained(str(folder)) if (folder / MARKER).is_file() else None
        local = cfg.path(name)
        if (local / "config.json").is_file():
            return AutoConfig.from_pretrained(str(local), trust_remote_code=trust)
        return AutoConfig.from_pretrained(
            name, revision=cfg.model.revision, trust_remote_code=trust, local_files_only=True
        )
    except Exception:  # not cached, or a config this transformers cannot read
        return None


def layer_classes_of(hf_config: Any) -> list[str]:
    """The decoder-layer class names of a model, from its config alone: the causal-LM class that
    transformers maps the config to says which modules must stay whole (`_no_split_modules`, a class
    attribute: nothing is instantiated). Remote-code and unmapped models: '<Arch>DecoderLayer' by the
    naming convention of `architectures[0]` ('Qwen3ForCausalLM' -> 'Qwen3DecoderLayer')."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for c in (hf_config, getattr(hf_config, "get_text_config", lambda: hf_config)()):
        try:
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(c)]
        except (KeyError, ValueError):
            continue
        names = list(getattr(cls, "_no_split_modules", None) or [])
        layers = [n for n in names if n.endswith("DecoderLayer")]
        if layers or names:
            return layers or names
    for arch in getattr(hf_config, "architectures", None) or []:
        for suffix in ("ForCausalLM", "ForConditionalGeneration", "Model"):
            if arch.endswith(suffix) and arch != suffix:
                return [arch.removesuffix(suffix) + "DecoderLayer"]
    return []


def decoder_layer_classes(cfg: Config) -> tuple[list[str], str]:
    """(class names FSDP wraps one by one, where they came from). [] = not known here: accelerate then
    wraps by the loaded model's own `_no_split_modules`, which covers transformers' models."""
    hf = _hf_config(cfg)
    if hf is not None:
        names = layer_classes_of(hf)
        if names:
            return names, f"from the {type(hf).__name__} of {cfg.model.name_or_path}"
    key = cfg.model.name_or_path.rstrip("/").rsplit("/", 1)[-1].lower()
    for prefix, layer in _LAYER_BY_NAME:
        if key.startswith(prefix):
            return [layer], f"by the model's name ({prefix} family; its config is not available here)"
    return [], "not known here: accelerate wraps the loaded model's _no_split_modules"


# --------------------------------------------------------------------------- TrainingArguments


def _checkpointing(cfg: Config, stage: str, device: str) -> bool:
    s = getattr(cfg, stage)
    if s.gradient_checkpointing != "auto":
        return bool(s.gradient_checkpointing)
    from .training import auto_checkpointing

    return auto_checkpointing(cfg, stage, device)


def fsdp_config(cfg: Config, stage: str, device: str, checkpointing: bool) -> dict[str, Any]:
    """transformers' `fsdp_config` (keys as TrainingArguments._process_fsdp_args reads them) for FSDP2."""
    method = getattr(cfg, stage).method
    layers, _ = decoder_layer_classes(cfg)
    out: dict[str, Any] = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        # Full sharding (ZeRO-3-like): a layer's weights are gathered for its forward and freed after.
        "reshard_after_forward": True,
        # LoRA checkpoints are adapters: one small file gathered on the main process, readable as it is.
        # Full and freeze: every process writes its own shard (no whole model gathered into one
        # process's RAM at each save); the final save gathers once (before_final_save).
        "state_dict_type": "FULL_STATE_DICT" if method in ("lora", "qlora") else "SHARDED_STATE_DICT",
        # Every process reads the weights itself: loading on the main process only and broadcasting needs
        # the model built after the arguments on meta weights, which is not tunepipe's loading order.
        "cpu_ram_efficient_loading": False,
        # FSDP's own checkpointing (the trainer's would add an all-gather in the backward pass; the
        # trainer refuses both at once).
        "activation_checkpointing": bool(checkpointing),
    }
    if layers:
        out["transformer_layer_cls_to_wrap"] = layers
    return out


def trainer_kwargs(
    cfg: Config, stage: str, device: str, world_size: int, *, checkpointing: bool | None = None
) -> dict[str, Any]:
    """The TrainingArguments (TRL SFTConfig/DPOConfig) keywords for hardware.sharding, merged last
    into the stage's arguments. `checkpointing` is the stage's resolved gradient checkpointing (None =
    decided here as the training stage decides it): under FSDP it moves into fsdp_config.

    One process has nothing to shard: {} for ddp/fsdp/zero*, except a DeepSpeed JSON of your own
    (ZeRO-Offload on one GPU is a real use of it)."""
    r = resolve(cfg)
    if r.kind == "deepspeed" and cfg.hardware.deepspeed:
        return {"deepspeed": str(cfg.path(cfg.hardware.deepspeed))}
    if world_size < 2 or r.kind == "ddp":
        return {}
    if r.kind == "fsdp":
        ck = _checkpointing(cfg, stage, device) if checkpointing is None else checkpointing
        return {
            "fsdp": True,
            "fsdp_config": fsdp_config(cfg, stage, device, ck),
            "activation_checkpointing": False,
            "activation_checkpointing_kwargs": None,
        }
    return {"deepspeed": deepspeed_config(r.zero_stage)}


# --------------------------------------------------------------------------- rules


def check(cfg: Config) -> list[str]:
    """Combinations that cannot train, each as "<problem>; <fix>" (config validation, doctor and
    preflight call this; an empty list = none)."""
    hw, problems = cfg.hardware, []
    explicit = "sharding" in hw.model_fields_set
    if hw.deepspeed:
        try:
            _user_deepspeed(cfg)
        except ValueError as e:
            problems.append(str(e))
        if explicit and hw.sharding in ("ddp", "fsdp"):
            problems.append(
                f"hardware.deepspeed is set but hardware.sharding is {hw.sharding} (a DeepSpeed JSON runs "
                "only with ZeRO); set hardware.sharding: zero2 or zero3 (its stage), or remove "
                "hardware.deepspeed"
            )
    r = resolve(cfg)
    shards_weights = r.kind == "fsdp" or (r.kind == "deepspeed" and r.zero_stage == 3)
    engine = "FSDP" if r.kind == "fsdp" else "ZeRO-3"
    if cfg.model.load_in_4bit and shards_weights:
        if cfg.model.bnb_4bit_quant_storage != "bfloat16":
            problems.append(
                f"QLoRA (model.load_in_4bit) with {engine} ({r.source}) cannot shard 4-bit weights stored "
                "as uint8; set model.bnb_4bit_quant_storage: bfloat16 (4-bit weights packed into bf16 "
                f"tensors, which {engine} shards), or hardware.sharding: ddp / zero2 (a whole 4-bit copy "
                "per GPU)"
            )
        if r.kind == "fsdp" and cfg.model.dtype in ("float16", "float32"):
            problems.append(
                "QLoRA with FSDP needs the weights in bfloat16 like the 4-bit storage (FSDP shards tensors "
                f"of one dtype together), but model.dtype is {cfg.model.dtype}; set model.dtype: bfloat16 "
                "(or auto on a bf16 GPU)"
            )
    return problems


@dataclass(frozen=True)
class Advice:
    name: str
    detail: str
    fix: str


def advice(cfg: Config) -> list[Advice]:
    """Warnings about the sharding choice (it runs, but not as one may expect); doctor shows them."""
    hw, out = cfg.hardware, []
    r, world = resolve(cfg), world_size(cfg)
    if r.kind != "ddp" and world < 2 and not (r.kind == "deepspeed" and hw.deepspeed):
        out.append(
            Advice(
                "sharding",
                f"hardware.sharding: {hw.sharding} with 1 process: nothing to shard, it trains as one",
                "set hardware.processes (CPU) or hardware.gpus / hardware.nodes above 1, or sharding: ddp",
            )
        )
    explicit = "sharding" in hw.model_fields_set
    if hw.deepspeed and explicit and hw.sharding.startswith("zero") and r.zero_stage != int(hw.sharding[-1]):
        out.append(
            Advice(
                "sharding",
                f"hardware.sharding is {hw.sharding} but {hw.deepspeed} has ZeRO stage {r.zero_stage}: "
                "the JSON wins",
                f"set hardware.sharding: zero{r.zero_stage} to say what runs, or change the JSON",
            )
        )
    return out


def describe(cfg: Config) -> str:
    """One line for doctor: the engine, over how many processes, and what it shards."""
    r, world = resolve(cfg), world_size(cfg)
    where = f"{world} process(es)" + (" over gloo (CPU)" if cfg.hardware.gpus == 0 and world > 1 else "")
    if r.kind == "ddp":
        return f"ddp over {where}: a whole copy of the model in each ({r.source})"
    if r.kind == "fsdp":
        layers, how = decoder_layer_classes(cfg)
        wrap = ", ".join(layers) if layers else "the model's _no_split_modules"
        cpu = (
            "; on CPU accelerate has no FSDP: tunepipe marks its state FSDP itself (prepare_trainer)"
            if cfg.hardware.gpus == 0
            else ""
        )
        return (
            f"fsdp (FSDP2) over {where}: weights, gradients and optimizer state sharded, "
            f"wrapping {wrap} ({how}){cpu}"
        )
    shards = {
        1: "optimizer state",
        2: "optimizer state and gradients",
        3: "weights, gradients and optimizer state",
    }
    what = shards.get(r.zero_stage, "nothing (stage 0)")
    return f"DeepSpeed ZeRO-{r.zero_stage} over {where}: {what} sharded ({r.source})"


# --------------------------------------------------------------------------- trainer hooks


def prepare_trainer(trainer: Any) -> bool:
    """Call after building the trainer, before `train()`. FSDP on CPU processes: accelerate 1.15 keeps
    the FSDP plugin only for GPU-like distributed types and trains DDP on MULTI_CPU (gloo) without a
    word. torch's FSDP2 runs on CPU over gloo, so mark accelerate's state FSDP with the trainer's own
    plugin; `train()` then wraps the model with `fully_shard`. Returns whether it changed anything
    (False on GPUs, without fsdp, or when accelerate already runs FSDP)."""
    args = getattr(trainer, "args", None)
    if getattr(args, "fsdp_plugin_args", None) is None or getattr(trainer, "is_fsdp_enabled", False):
        return False
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # Every AcceleratorState() copies PartialState's shared dict over its own: set both, or the next
    # AcceleratorState() (the trainer makes several) puts MULTI_CPU back.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    return True


def before_final_save(trainer: Any) -> None:
    """Before the stage's final `trainer.save_model(dir)` (on every process): FSDP with sharded
    checkpoints saves no weights in save_model; switch to a full state dict gathered on the main
    process for that one save."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    if "SHARDED" in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")
