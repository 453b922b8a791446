"""Memory and time estimates for a training stage, from the config and the model's shape only (no
weights are loaded). `doctor` prints them; the OOM guard uses `starting_batch` to pick a first
micro-batch that fits.

Model shape
    `ModelShape.from_config` reads the model's `config.json` (local folder, imported embedded model,
    or the Hugging Face cache, offline). When the model is not available locally it falls back to a
    built-in table of well-known architectures and says so. Parameters are counted analytically:
    per layer  q: h*q, k and v: h*kv each, o: q*h (+ biases), MLP: 3*h*i, norms: 2h (+ 2*head_dim
    for Qwen3's q/k norms); plus embeddings V*h, an untied lm_head V*h and the final norm h.
    h = hidden size, i = intermediate size, q = heads*head_dim, kv = kv_heads*head_dim, V = vocab.

Memory per device (`estimate_memory`), in bytes; every term is one row of `MemoryEstimate.table()`:
    weights      16-bit: 2 B/param, fp32: 4 B/param. 4-bit (QLoRA, bitsandbytes NF4 with double
                 quantization): the decoder's linear layers at 0.5 B/param + quantization constants
                 (8-bit absmax per 64 weights, fp32 per 256 absmax: 1/64 + 1/4096 B/param); embeddings,
                 lm_head and norms stay in the weights dtype (16-bit on GPU, fp32 on CPU, where
                 bitsandbytes >= 0.46 runs the same NF4 layers). On CPU with bf16 autocast, the bf16
                 copies autocast makes of every linear weight are saved for the backward pass: + 2 B per
                 linear parameter (4-bit layers dequantize in their own op: only the lm_head's copy).
    trainable    lora/qlora: r*(in+out) per adapted module (all-linear = q, k, v, o, gate, up, down in
                 every layer), stored in fp32 (PEFT upcasts adapters; bf16 under ZeRO-3 without 4-bit).
                 full: every parameter (already counted in weights). freeze: the last N layers + final norm.
    gradients    one per trainable parameter, in its dtype (fp32 for LoRA).
    optimizer    AdamW (adamw_torch*): 2 states per trainable parameter in its dtype; 8-bit optimizers
                 (`*8bit`): 2 B; sgd: 0; adafactor: ~0 (factored); lion: 1 state.
    activations  per token per layer, bytes, measured with saved-tensor hooks on Llama/Qwen3 layers
                 (transformers 5, torch 2; least-squares fit, residual < 1%):
                     16-bit weights + autocast(GPU) lora: 19h + 6q + 5kv + 8i    full: 16h + 4q + 4kv + 8i
                     16-bit weights, no autocast   lora: 28h + 8q + 5kv + 10i    full: 16h + 4q + 4kv + 8i
                     fp32 weights + bf16 autocast  lora: 19h + 6q + 5kv + 8i     full: 26h + 4q + 4kv + 8i
                     fp32 weights                  lora: 16h + 8q + 9kv + 16i    full: 24h + 8q + 8kv + 16i
                 + Qwen3 q/k norms: 4(q + kv); + LoRA dropout > 0: 2*b*(5h + q + i) (dropped input and
                 mask per adapted module; b = activation bytes). Flash/SDPA attention keeps no S^2 scores
                 (eager attention adds 6 B * heads * S per token per layer).
                 With gradient checkpointing each layer keeps only its input (b_res*h per token, b_res = 2
                 for 16-bit, 4 for fp32 weights) and one layer is recomputed at a time (+ one layer's full
                 activations). method freeze: only the trainable last N layers keep activations.
                 Tokens = micro-batch * data.max_length (the longest batch is the peak); DPO: 2 sequences
                 (chosen + rejected) per example. On CPU, x 1.5 (CPU_ALLOCATOR_FACTOR): glibc keeps the
                 forward pass's freed temporaries resident, so peak RSS grows faster than the saved tensors
                 (measured on SmolLM2-135M LoRA).
    logits       TRL >= 1 scores tokens through a chunked LM head (`fused_lm_head`, used by SFTTrainer and
                 DPOTrainer): one tile of min(tokens, 4096) x min(V, 32768) at a time: 6 B per tile entry on
                 GPU (the 16-bit tile, its gradient made in place), 32 B on CPU (torch ops: fp32 copies, exp,
                 masks; measured). Without it (older TRL): per token (b_logit + 4 + 4) * V, the logits,
                 their fp32 upcast and the fp32 log-softmax, often the largest term for 150k vocabularies.
    reference    DPO only. adapter: the policy with its adapter disabled (no copy); precompute: none at
                 training time; copy: a second frozen copy of the weights.
    overhead     GPU: 1 GiB (CUDA context, cuBLAS workspace, allocator slack). CPU: the resident memory of a
                 process that has imported the training stack, measured once in a subprocess
                 (`cpu_baseline_bytes`), + 64 MiB for trainer, tokenizer and data (measured on a tiny model).
    Sharding     per process, over the world size W = hardware.processes (default: hardware.gpus, 1 on
                 CPU) x hardware.nodes; the engine is `sharding.resolve` (hardware.sharding, or the stage
                 of hardware.deepspeed):
                 ddp     every process holds all of the above, + `buffers`: DDP's reduction buckets, a
                         flat copy of the gradients (transformers does not set gradient_as_bucket_view);
                         W > 1 only.
                 zero2   DeepSpeed ZeRO-2: optimizer state and gradients / W (stage 1: optimizer state only).
                         With bf16/fp16 on a GPU DeepSpeed casts the module (LoRA adapters too) to 16 bits
                         and its optimizer holds fp32 master weights + fp32 states: AdamW 12 B per
                         trainable parameter before sharding (ZeRO's 2 + 2 + 12).
                 zero3   ZeRO-3: weights and trainable parameters / W too, + `gathered`: the parameters
                         gathered for compute, one module ahead (prefetch): 2 x the larger of a decoder layer
                         and the embedding matrix, in the weights' dtype.
                 fsdp    FSDP2 (reshard after forward): weights, trainable, gradients, optimizer / W;
                         with bf16/fp16 mixed precision on a GPU accelerate upcasts the trainable
                         parameters to fp32 (sharded fp32 master weights: full fine-tuning 4 B per
                         parameter / W, fp32 gradients and AdamW states), + `gathered`: 2 decoder layers
                         (current + prefetched) and the root module's embeddings/lm_head, which stay
                         gathered for the whole step.
                 Activations, logits and overhead are per process under every engine. Offloaded optimizer
                 state (a DeepSpeed JSON's offload_optimizer) is not on the GPU. `compare_sharding` gives
                 the estimate under each of the four choices.
    `fits(gpu_memory_gb)` keeps 5% of the device free for fragmentation.

Time per stage (`estimate_time`):
    forward FLOPs per token  F = 2*N_mm + 2*L*S*q   (N_mm: parameters in matmuls incl. lm_head, not the
                             embedding lookup; the second term is causal attention at sequence length S)
    training FLOPs per token full: 3F (forward + backward);  lora/qlora: 2F (the frozen base needs the
                             activation gradients but no weight gradients);  freeze: F + 2F*(share of the
                             last N layers);  gradient checkpointing: + F (the recomputed forward).
    DPO                      2 sequences per example, + F per token for the reference forward (adapter, copy;
                             precompute does it once before training).
    tokens                   steps * micro-batch * accumulation * world size * mean tokens per sequence;
                             steps = max_steps, or epochs * ceil(ceil(n / (batch * world)) / accumulation).
    seconds                  FLOPs / (world size * peak * MFU). Peak bf16 dense: H100/H200 989 TFLOP/s,
                             A100 312, L40S 362, A10G 125 (picked by torch's device name, else by
                             hardware.gpu_memory_gb: >= 80 GB -> H100, >= 40 -> A100, else A10G);
                             MFU 0.35. CPU: a matmul measured once on this machine (`cpu_matmul_flops`)
                             * 0.5. QLoRA x 1.3 for dequantisation on both (CPU: 1.15-1.9x measured).
    budget                   hardware.time_limit * this stage's hardware.time_shares (normalised over the
                             enabled stages), as the pipeline shares it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from . import sharding
from .config import Config, StageTrainingConfig
from .plan import Machine, resolve_plan
from .stages.registry import TrainingStage, title


def _spec(stage: str) -> TrainingStage:
    from .stages import registry

    return registry.get(stage)


Stage = str  # a registered training stage (stages.registry)
Device = Literal["cuda", "cpu"]

GiB = 1024**3
MiB = 1024**2
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPU_OVERHEAD_BYTES = 1 * GiB
CPU_TRAINER_BYTES = 64 * MiB  # trainer, accelerate state, tokenizer and dataset beyond the imports
FITS_HEADROOM = 0.95
GENERATION_EFFICIENCY = 0.1  # sampled tokens' FLOPs run at this share of the training rate (assumed)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 1 / 4096
# TRL's chunked LM head (trl/kernels/chunked_logprob.py): tiles of 4096 tokens x 32768 vocabulary entries.
FUSED_TOKEN_CHUNK, FUSED_VOCAB_CHUNK = 4096, 32768
FUSED_TILE_BYTES_GPU = 6  # the 16-bit tile, turned into its gradient in place; fp32 statistics per row
FUSED_TILE_BYTES_CPU = 32  # torch ops instead of a Triton kernel: fp32 copies, exp, masks (measured)
# Peak RSS growth / saved activation bytes on CPU, measured on SmolLM2-135M LoRA (glibc malloc).
CPU_ALLOCATOR_FACTOR = 1.5


class PlannerError(Exception):
    """No estimate possible (model shape unknown); the message says what to do."""


# --------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    attention_bias: bool = False  # Qwen2/2.5: biases on q, k, v
    source: str = ""  # where the shape came from, for `doctor`

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module in one decoder layer."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.module_dims().values())

    @property
    def layer_params(self) -> int:
        extra = 2 * self.hidden_size  # input and post-attention norms
        if self.attention_bias:
            extra += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            extra += 2 * self.head_dim
        return self.linear_params_per_layer + extra

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus an untied lm_head."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def n_params(self) -> int:
        return self.num_layers * self.layer_params + self.embedding_params + self.hidden_size

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (the lm_head, not the embedding lookup)."""
        return self.num_layers * self.linear_params_per_layer + self.vocab_size * self.hidden_size

    def lora_params(self, r: int, target_modules: list[str] | str) -> int:
        dims = self.module_dims()
        if target_modules == "all-linear":
            names = list(dims)
        else:
            wanted = [target_modules] if isinstance(target_modules, str) else target_modules
            names = [m for m in dims if any(m == t or m.endswith(t) for t in wanted)]
        return self.num_layers * sum(r * (dims[m][0] + dims[m][1]) for m in names)

    @classmethod
    def from_hf_config(cls, hf: Any, name: str, source: str) -> ModelShape:
        text = getattr(hf, "get_text_config", lambda: hf)()  # multimodal configs nest the LM's
        heads = text.num_attention_heads
        return cls(
            name=name,
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qk_norm=getattr(text, "model_type", "") in ("qwen3", "qwen3_moe"),
            attention_bias=bool(getattr(text, "attention_bias", False))
            or getattr(text, "model_type", "") == "qwen2",
            source=source,
        )

    @classmethod
    def from_config(cls, cfg: Config) -> ModelShape:
        """The shape of `cfg.model` without loading weights; raises PlannerError when unknown."""
        from .quickstart.model import MARKER, embedded_model_dir, is_alias

        name = cfg.model.name_or_path
        if is_alias(name):
            folder = embedded_model_dir(name)
            if not (folder / MARKER).is_file():  # not imported yet: importing takes ~30 s, the table doesn't
                return _from_table(name, "the embedded model (not imported yet)")
            return _from_folder(cls, folder, name, cfg)
        local = cfg.path(name)
        if (local / "config.json").is_file():
            return _from_folder(cls, local, name, cfg)
        try:
            from transformers import AutoConfig

            hf = AutoConfig.from_pretrained(
                name,
                revision=cfg.model.revision,
                trust_remote_code=cfg.model.trust_remote_code,
                local_files_only=True,
            )
            return cls.from_hf_config(hf, name, f"config.json of {name} in the Hugging Face cache")
        except Exception:  # not cached, no network, or a config this transformers cannot read
            return _from_table(name, "the model is not available locally")


def _from_folder(cls: type[ModelShape], folder: Path, name: str, cfg: Config) -> ModelShape:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(folder), trust_remote_code=cfg.model.trust_remote_code)
    return cls.from_hf_config(hf, name, f"{folder / 'config.json'}")


def _shape(v: int, h: int, i: int, n_layers: int, heads: int, kv: int, hd: int, tie: bool, **kw: Any) -> dict:
    return dict(
        vocab_size=v,
        hidden_size=h,
        intermediate_size=i,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hd,
        tie_word_embeddings=tie,
        **kw,
    )


# Well-known architectures, from their config.json files: used when the model is not available locally
# (e.g. `doctor` on a laptop for a GPU run). Keys are lower-case repo names without the organisation.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _shape(151936, 1024, 3072, 28, 16, 8, 128, True, qk_norm=True),
    "qwen3-1.7b": _shape(151936, 2048, 6144, 28, 16, 8, 128, True, qk_norm=True),
    "qwen3-4b": _shape(151936, 2560, 9728, 36, 32, 8, 128, True, qk_norm=True),
    "qwen3-8b": _shape(151936, 4096, 12288, 36, 32, 8, 128, False, qk_norm=True),
    "qwen3-14b": _shape(151936, 5120, 17408, 40, 40, 8, 128, False, qk_norm=True),
    "qwen2.5-0.5b": _shape(151936, 896, 4864, 24, 14, 2, 64, True, attention_bias=True),
    "qwen2.5-1.5b": _shape(151936, 1536, 8960, 28, 12, 2, 128, True, attention_bias=True),
    "qwen2.5-3b": _shape(151936, 2048, 11008, 36, 16, 2, 128, True, attention_bias=True),
    "qwen2.5-7b": _shape(152064, 3584, 18944, 28, 28, 4, 128, False, attention_bias=True),
    "llama-3.2-1b": _shape(128256, 2048, 8192, 16, 32, 8, 64, True),
    "llama-3.2-3b": _shape(128256, 3072, 8192, 28, 24, 8, 128, True),
    "llama-3.1-8b": _shape(128256, 4096, 14336, 32, 32, 8, 128, False),
    "meta-llama-3.1-8b": _shape(128256, 4096, 14336, 32, 32, 8, 128, False),
    "mistral-7b-v0.3": _shape(32768, 4096, 14336, 32, 32, 8, 128, False),
    "smollm2-135m": _shape(49152, 576, 1536, 30, 9, 3, 64, True),
    "smollm2-360m": _shape(49152, 960, 2560, 32, 15, 5, 64, True),
    "smollm2-1.7b": _shape(49152, 2048, 8192, 24, 32, 32, 64, True),
}
_VARIANT = re.compile(r"(-instruct|-base|-chat|-it|-hf|-\d{4})+$")


def _from_table(name: str, why: str) -> ModelShape:
    key = _VARIANT.sub("", name.rstrip("/").rsplit("/", 1)[-1].lower())
    if key not in KNOWN_SHAPES:
        raise PlannerError(
            f"cannot estimate memory for {name!r}: {why}, and it is not in the planner's table of known "
            f"models ({', '.join(sorted(KNOWN_SHAPES))}). Download its config.json first "
            f"(`huggingface-cli download {name} config.json`) or point model.name_or_path at a local folder"
        )
    return ModelShape(name=name, source=f"built-in table ({why})", **KNOWN_SHAPES[key])


# --------------------------------------------------------------------------- resolved settings


@dataclass(frozen=True)
class Setup:
    """What the stage will run with, as far as memory and time are concerned."""

    device: Device
    world_size: int
    sharding: str  # ddp | fsdp | zero1 | zero2 | zero3
    zero_stage: int
    offload_optimizer: bool
    weights_bytes_per_param: float  # 16-bit, fp32 or 4-bit
    autocast: bool  # fp32 weights with bf16 autocast (CPU)
    checkpointing: bool
    batch: int
    seq_len: int
    sequences_per_example: int


def resolve_device(cfg: Config, device: Device | None) -> Device:
    return device or ("cuda" if cfg.hardware.gpus > 0 else "cpu")


def zero_settings(cfg: Config) -> tuple[int, bool]:
    """(ZeRO stage, optimizer offloaded) as configured (hardware.sharding / hardware.deepspeed);
    (0, False) for ddp and fsdp."""
    r = sharding.resolve(cfg)
    return r.zero_stage, r.offload_optimizer


SHARDINGS = ("ddp", "fsdp", "zero2", "zero3")


def checkpointing_decision(
    cfg: Config, stage: Stage, *, device: Device | None = None, memory_bytes: float | None = None
) -> tuple[bool, str]:
    """Gradient checkpointing for `gradient_checkpointing: auto`, and why: only when the memory plan
    needs it. It costs ~30% more compute (a second forward), so: off on CPU (memory is not the limit
    there, time is); on a GPU, off when the stage fits in `memory_bytes` (default
    hardware.gpu_memory_gb) without it, on when it does not. Without a known capacity or model shape,
    the field's habit: on for SFT, off for DPO."""
    s: StageTrainingConfig = getattr(cfg, stage)
    if s.gradient_checkpointing != "auto":
        return bool(s.gradient_checkpointing), f"set in {stage}.gradient_checkpointing"
    dev = resolve_device(cfg, device)
    if dev == "cpu":
        return False, "auto: off on CPU (memory is not the limit there, time is)"
    capacity = memory_bytes or (cfg.hardware.gpu_memory_gb * GiB if cfg.hardware.gpu_memory_gb else None)
    try:
        if capacity is None:
            raise PlannerError("GPU memory unknown: set hardware.gpu_memory_gb")
        without = estimate_memory(cfg, stage, device="cuda", checkpointing=False)
    except PlannerError as e:
        # The field's habit: on where no reference pass runs through the checkpointed model (SFT,
        # GRPO without KL), off where one does (DPO, KTO).
        habit = s.reference_policy() is None
        return habit, f"auto: {'on' if habit else 'off'} for {title(stage)} on a GPU (no memory plan: {e})"
    need, have = without.total_bytes / GiB, capacity / GiB
    if without.total_bytes <= capacity * FITS_HEADROOM:
        return False, f"auto: off, the plan fits without it (~{need:.1f} of {have:.0f} GiB)"
    return True, f"auto: on, without it the plan needs ~{need:.1f} GiB of {have:.0f} GiB"


def _setup(
    cfg: Config,
    stage: Stage,
    device: Device | None,
    batch: int | None,
    checkpointing: bool | None = None,
    shard: str | None = None,
) -> Setup:
    s: StageTrainingConfig = getattr(cfg, stage)
    dev = resolve_device(cfg, device)
    plan = resolve_plan(cfg, Machine.target(cfg, device=dev))
    world = plan.processes
    configured = sharding.resolve(cfg)
    shard = shard or configured.label
    zero = int(shard[-1]) if shard.startswith("zero") else 0
    # A DeepSpeed JSON's optimizer offload applies to the configured choice only (and to GPUs).
    offload = dev == "cuda" and shard == configured.label and configured.offload_optimizer
    wbytes = 4.0 if plan.dtype == "float32" else 2.0  # 4-bit layers are counted in _weights_bytes
    if checkpointing is None:
        checkpointing = s.gradient_checkpointing
    if checkpointing == "auto":  # as training.trainer_args decides it
        checkpointing = dev == "cuda" and checkpointing_decision(cfg, stage, device=dev)[0]
    return Setup(
        device=dev,
        world_size=world,
        sharding=shard,
        zero_stage=zero,
        offload_optimizer=offload,
        weights_bytes_per_param=wbytes,
        autocast=plan.bf16_autocast,
        checkpointing=bool(checkpointing),
        batch=batch or s.per_device_train_batch_size,
        seq_len=s.sequence_tokens(cfg.data.max_length),
        sequences_per_example=_spec(stage).sequences_per_example,
    )


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    stage: Stage
    device: Device
    device_label: str
    method: str
    shape: ModelShape
    batch: int  # per-device micro-batch (examples)
    seq_len: int
    world_size: int
    zero_stage: int
    gradient_checkpointing: bool
    trainable_params: int
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    reference: int
    overhead: int
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    notes: dict[str, str] = field(default_factory=dict)
    sharding: str = "ddp"
    gathered: int = 0  # FSDP / ZeRO-3: sharded parameters gathered for compute
    buffers: int = 0  # DDP: gradient reduction buckets

    @property
    def model_state_bytes(self) -> int:
        """Weights, trainable parameters, gradients and optimizer state: what sharding divides."""
        return self.weights + self.trainable + self.gradients + self.optimizer

    @property
    def total_bytes(self) -> int:
        return (
            self.weights
            + self.trainable
            + self.gradients
            + self.optimizer
            + self.gathered
            + self.buffers
            + self.activations
            + self.logits
            + self.reference
            + self.overhead
        )

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total_bytes <= gpu_memory_gb * GiB * FITS_HEADROOM

    def table(self) -> list[tuple[str, str, str]]:
        """Rows (component, GiB, how it was counted) for printing, the total last."""
        rows = [
            (name, f"{getattr(self, name) / GiB:.2f}", self.notes.get(name, ""))
            for name in (
                "weights",
                "trainable",
                "gradients",
                "optimizer",
                "gathered",
                "buffers",
                "activations",
                "logits",
                "reference",
                "overhead",
            )
        ]
        rows.append(("total", f"{self.total_bytes / GiB:.2f}", f"per {self.device_label}"))
        return rows

    def summary(self) -> str:
        ckpt = "on" if self.gradient_checkpointing else "off"
        other = (
            self.activations_without_checkpointing
            if self.gradient_checkpointing
            else self.activations_with_checkpointing
        )
        return (
            f"{self.stage}: ~{self.total_bytes / GiB:.1f} GiB peak per {self.device_label} "
            f"({self.method}, micro-batch {self.batch} x {self.seq_len} tokens, checkpointing {ckpt}; "
            f"activations {self.activations / GiB:.1f} GiB, {other / GiB:.1f} GiB with it "
            f"{'off' if self.gradient_checkpointing else 'on'})"
        )


# Activation bytes per token per layer: (h, q, kv, i) coefficients, see the module docstring.
_ACT = {
    ("16bit+autocast", "lora"): (19, 6, 5, 8),
    ("16bit+autocast", "full"): (16, 4, 4, 8),
    ("16bit", "lora"): (28, 8, 5, 10),
    ("16bit", "full"): (16, 4, 4, 8),
    ("autocast", "lora"): (19, 6, 5, 8),
    ("autocast", "full"): (26, 4, 4, 8),
    ("fp32", "lora"): (16, 8, 9, 16),
    ("fp32", "full"): (24, 8, 8, 16),
}


def activation_bytes_per_token_layer(
    shape: ModelShape, setup: Setup, method: str, lora_dropout: float, attn: str
) -> float:
    if setup.device == "cuda":  # the Trainer runs bf16/fp16 models under autocast
        regime = "16bit+autocast" if setup.weights_bytes_per_param == 2 else "fp32"
    elif setup.autocast:
        regime = "autocast"
    else:
        regime = "fp32" if setup.weights_bytes_per_param == 4 else "16bit"
    ch, cq, ckv, ci = _ACT[(regime, "lora" if method in ("lora", "qlora") else "full")]
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    b = 4 if regime == "fp32" else 2
    per = ch * h + cq * q + ckv * kv + ci * i
    if shape.qk_norm:
        per += 4 * (q + kv)
    if method in ("lora", "qlora") and lora_dropout > 0:
        per += 2 * b * (5 * h + q + i)
    if attn == "eager":
        per += 6 * shape.num_heads * setup.seq_len
    return per


@cache
def trl_fused_lm_head() -> bool:
    """TRL >= 1.x scores tokens through a chunked LM head (`fused_lm_head`): no [tokens, vocab] logits."""
    try:
        return importlib.util.find_spec("trl.kernels.chunked_logprob") is not None
    except (ImportError, ValueError):
        return False


def _logits_bytes(shape: ModelShape, st: Setup, tokens: int) -> tuple[int, str]:
    if trl_fused_lm_head():
        rows, cols = min(tokens, FUSED_TOKEN_CHUNK), min(shape.vocab_size, FUSED_VOCAB_CHUNK)
        per = FUSED_TILE_BYTES_CPU if st.device == "cpu" else FUSED_TILE_BYTES_GPU
        return rows * cols * per, f"TRL chunked LM head: {rows:,} x {cols:,} tile x {per} B"
    b = 4 if (st.weights_bytes_per_param == 4 and not st.autocast) else 2
    return tokens * (b + 8) * shape.vocab_size, f"{tokens:,} tokens x vocab {shape.vocab_size:,} x {b + 8} B"


def _weights_bytes(shape: ModelShape, setup: Setup, four_bit: bool) -> int:
    if four_bit:
        linear = shape.num_layers * shape.linear_params_per_layer
        return int(linear * NF4_BYTES_PER_PARAM + (shape.n_params - linear) * setup.weights_bytes_per_param)
    return int(shape.n_params * setup.weights_bytes_per_param)


def _optimizer_states(optim: str) -> tuple[float, str]:
    """(bytes per trainable parameter relative to its dtype or absolute for 8-bit, description)."""
    o = optim.lower()
    if "8bit" in o:
        return -2.0, f"{optim}: 2 x 1 B per trainable parameter"
    if "sgd" in o:
        return 0.0, f"{optim}: no state"
    if "adafactor" in o:
        return 0.0, f"{optim}: factored state, ~0"
    if "lion" in o:
        return 1.0, f"{optim}: 1 state per trainable parameter"
    return 2.0, f"{optim}: 2 states per trainable parameter"


def estimate_memory(
    cfg: Config,
    stage: Stage,
    *,
    device: Device | None = None,
    batch: int | None = None,
    shape: ModelShape | None = None,
    checkpointing: bool | None = None,
    shard: str | None = None,
) -> MemoryEstimate:
    """Peak memory per device (per process) of training `stage` (formulas in the module docstring).

    device: "cuda" (per GPU of hardware.gpus) or "cpu" (this machine); default from hardware.gpus.
    batch: per-device micro-batch; default the stage's per_device_train_batch_size.
    checkpointing: force gradient checkpointing on or off; default as the stage will run.
    shard: ddp | fsdp | zero1 | zero2 | zero3 instead of the configured hardware.sharding."""
    s: StageTrainingConfig = getattr(cfg, stage)
    shape = shape or ModelShape.from_config(cfg)
    st = _setup(cfg, stage, device, batch, checkpointing, shard)
    method = s.method
    four_bit = cfg.model.load_in_4bit  # NF4 on the GPU and, with bitsandbytes >= 0.46, on the CPU
    lora = method in ("lora", "qlora")
    notes: dict[str, str] = {}
    world = st.world_size

    # weights
    weights = _weights_bytes(shape, st, four_bit)
    if four_bit:
        rest = int(st.weights_bytes_per_param * 8)
        notes["weights"] = f"NF4 4-bit linear layers + {rest}-bit embeddings/norms"
    else:
        notes["weights"] = f"{int(st.weights_bytes_per_param * 8)}-bit, {shape.n_params / 1e9:.2f}B params"
    if st.autocast:
        # bitsandbytes' 4-bit matmul dequantizes inside its own op and saves no bf16 copy
        linear = 0 if four_bit else shape.num_layers * shape.linear_params_per_layer
        linear += shape.vocab_size * shape.hidden_size
        weights += 2 * linear
        notes["weights"] += " + bf16 autocast copies of linear weights"

    # trainable parameters, their gradients and optimizer state
    # FSDP2 under bf16/fp16 mixed precision (a GPU with 16-bit weights): accelerate upcasts the
    # trainable parameters to fp32 before sharding them.
    fsdp_upcast = st.sharding == "fsdp" and st.device == "cuda" and st.weights_bytes_per_param == 2
    # DeepSpeed with bf16/fp16 casts the whole module (LoRA adapters too) to 16 bits and keeps fp32
    # master weights and fp32 optimizer states in its optimizer.
    ds_mixed = st.zero_stage >= 1 and st.device == "cuda" and st.weights_bytes_per_param == 2
    if lora:
        n_train = shape.lora_params(s.lora.r, s.lora.target_modules)
        tbytes = 2 if (ds_mixed and not four_bit) else 4
        trainable = n_train * tbytes
        notes["trainable"] = f"LoRA r={s.lora.r}: {n_train / 1e6:.1f}M params, {tbytes} B each"
    elif method == "full":
        n_train = shape.n_params
        tbytes = 4 if fsdp_upcast else int(st.weights_bytes_per_param)
        trainable = 0
        notes["trainable"] = f"full: all {n_train / 1e9:.2f}B params (in weights)"
    else:  # freeze
        n_layers = min(s.freeze_trainable_layers, shape.num_layers)
        n_train = n_layers * shape.layer_params + shape.hidden_size
        tbytes = 4 if fsdp_upcast else int(st.weights_bytes_per_param)
        trainable = 0
        notes["trainable"] = f"freeze: last {n_layers} layers, {n_train / 1e6:.0f}M params (in weights)"
    if fsdp_upcast and method != "lora" and method != "qlora":
        weights += int(n_train * (tbytes - st.weights_bytes_per_param))
        notes["weights"] += "; trainable ones upcast to fp32 (FSDP2 mixed precision)"
    gradients = n_train * tbytes
    notes["gradients"] = f"{tbytes} B per trainable parameter"
    per_state, optim_note = _optimizer_states(cfg.training.optim)
    state_bytes = 4 if ds_mixed else tbytes
    optimizer = int(n_train * (abs(per_state) if per_state < 0 else per_state * state_bytes))
    notes["optimizer"] = optim_note
    if ds_mixed:
        optimizer += n_train * 4
        notes["optimizer"] += ", fp32, + DeepSpeed's fp32 master weights"

    # sharding
    compute_bytes = 0.5 if four_bit else st.weights_bytes_per_param  # a layer as it is gathered
    layer_bytes = int(shape.layer_params * compute_bytes)
    embed_bytes = int(shape.embedding_params * 2 if four_bit else shape.embedding_params * compute_bytes)
    gathered = buffers = 0
    if st.sharding == "fsdp":
        optimizer //= world
        gradients //= world
        weights //= world
        trainable //= world
        if world > 1:
            gathered = 2 * layer_bytes + embed_bytes
            notes["gathered"] = "FSDP2: 2 decoder layers (current + prefetched) + the root's embeddings"
        notes["optimizer"] += f"; FSDP2 over {world}"
    if st.zero_stage >= 1:
        optimizer //= world
    if st.zero_stage >= 2:
        gradients //= world
    if st.zero_stage >= 3:
        weights //= world
        trainable //= world
        if world > 1:
            gathered = 2 * max(layer_bytes, embed_bytes)
            notes["gathered"] = "ZeRO-3: the module in use + the one prefetched (a layer or the embeddings)"
    if st.offload_optimizer:
        optimizer = 0
        notes["optimizer"] += " (offloaded to CPU)"
    if st.zero_stage:
        notes["optimizer"] += f"; ZeRO-{st.zero_stage} over {world}"
    if st.sharding == "ddp" and world > 1:
        buffers = gradients
        notes["buffers"] = f"DDP gradient buckets (a flat copy of the gradients), {world} processes"

    # activations and logits
    attn = cfg.model.attn_implementation  # auto is flash-attn or sdpa: neither keeps S^2 scores
    tokens = st.batch * st.sequences_per_example * st.seq_len
    per_layer = activation_bytes_per_token_layer(shape, st, method, s.lora.dropout, attn)
    act_layers = min(s.freeze_trainable_layers, shape.num_layers) if method == "freeze" else shape.num_layers
    without = int(tokens * act_layers * per_layer)
    residual_bytes = 4 if st.weights_bytes_per_param == 4 else 2
    with_ckpt = int(tokens * (act_layers * residual_bytes * shape.hidden_size + per_layer))
    activations = with_ckpt if st.checkpointing else without
    notes["activations"] = f"{tokens:,} tokens x {act_layers} layers x {per_layer / 1024:.1f} KiB" + (
        " (checkpointing: layer inputs + 1 layer)" if st.checkpointing else ""
    )
    if st.device == "cpu":
        # glibc keeps the forward pass's freed temporaries resident: peak RSS grows faster than the
        # tensors autograd saves (measured on SmolLM2-135M, see CPU_ALLOCATOR_FACTOR).
        activations = int(activations * CPU_ALLOCATOR_FACTOR)
        notes["activations"] += f" x {CPU_ALLOCATOR_FACTOR} (CPU allocator)"
    logits, notes["logits"] = _logits_bytes(shape, st, tokens)

    # The reference policy (DPO, KTO, GRPO with a KL term), as the stage's section holds it.
    reference = 0
    ref = s.reference_policy()
    if ref is not None:
        if ref == "copy":
            shards_ref = st.zero_stage >= 3 or st.sharding == "fsdp"
            reference = _weights_bytes(shape, st, four_bit) // (world if shards_ref else 1)
        notes["reference"] = {
            "adapter": "the policy with its adapter disabled: no copy",
            "precompute": "log-probs computed before training: no copy",
            "copy": "a second frozen copy of the weights",
        }[ref]

    if st.device == "cuda":
        overhead = GPU_OVERHEAD_BYTES
        notes["overhead"] = "CUDA context, workspaces, allocator slack"
    else:
        overhead = cpu_baseline_bytes() + CPU_TRAINER_BYTES
        notes["overhead"] = "measured RSS of python + torch/transformers/trl + trainer"

    return MemoryEstimate(
        stage=stage,
        device=st.device,
        device_label=gpu_label(cfg) if st.device == "cuda" else "CPU process",
        method=method,
        shape=shape,
        batch=st.batch,
        seq_len=st.seq_len,
        world_size=world,
        zero_stage=st.zero_stage,
        sharding=st.sharding,
        gathered=gathered,
        buffers=buffers,
        gradient_checkpointing=st.checkpointing,
        trainable_params=n_train,
        weights=weights,
        trainable=trainable,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
        reference=reference,
        overhead=overhead,
        activations_with_checkpointing=with_ckpt,
        activations_without_checkpointing=without,
        notes=notes,
    )


def compare_sharding(
    cfg: Config, stage: Stage, *, device: Device | None = None, shape: ModelShape | None = None
) -> dict[str, MemoryEstimate]:
    """The per-process estimate of `stage` under each of ddp, fsdp, zero2 and zero3 at the configured
    world size (the configured choice as configured, e.g. with its DeepSpeed JSON's offload)."""
    shape = shape or ModelShape.from_config(cfg)
    return {k: estimate_memory(cfg, stage, device=device, shape=shape, shard=k) for k in SHARDINGS}


def starting_batch(
    cfg: Config, stage: Stage, memory_bytes_available: int, *, device: Device | None = None
) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) to start with: the largest divisor of the configured
    micro-batch whose estimate fits in `memory_bytes_available` (with FITS_HEADROOM), accumulation
    raised so that micro-batch x accumulation stays the same. (1, ...) when nothing fits: the OOM guard
    then reports what else to change."""
    s: StageTrainingConfig = getattr(cfg, stage)
    b0, a0 = s.per_device_train_batch_size, s.gradient_accumulation_steps
    shape = ModelShape.from_config(cfg)
    for b in (d for d in range(b0, 0, -1) if b0 % d == 0):
        est = estimate_memory(cfg, stage, device=device, batch=b, shape=shape)
        if est.total_bytes <= memory_bytes_available * FITS_HEADROOM:
            return b, a0 * (b0 // b)
    return 1, a0 * b0


# --------------------------------------------------------------------------- CPU measurements


def import_training_stack() -> None:
    """Import what a training stage imports (the CPU baseline is this process's resident memory)."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: F401

    from . import pipeline  # noqa: F401


def peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux from /proc (VmHWM): `ru_maxrss` survives exec
    and so reports the parent's peak for a process started from a big one (e.g. a test runner)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024


_BASELINE_SCRIPT = (
    "from tunepipe.planner import import_training_stack, peak_rss_bytes\n"
    "import_training_stack()\n"
    "print(peak_rss_bytes())\n"
)


@cache
def cpu_baseline_bytes() -> int:
    """Peak RSS of a fresh Python that imported the training stack, measured once per installed
    set of versions (cached under TUNEPIPE_HOME; a few seconds the first time)."""
    from importlib.metadata import version

    from .quickstart.model import tunepipe_home

    key = "-".join(
        [
            "vmhwm",
            sys.version.split()[0],
            *(version(p) for p in ("torch", "transformers", "trl", "peft", "datasets")),
        ]
    )
    cache_file = tunepipe_home() / "planner-baseline.json"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return int(cached["bytes"])
    except (OSError, ValueError, KeyError):
        pass
    out = subprocess.run(
        [sys.executable, "-c", _BASELINE_SCRIPT], capture_output=True, text=True, timeout=300, check=True
    )
    value = int(out.stdout.strip().splitlines()[-1])
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"key": key, "bytes": value}))
    except OSError:
        pass
    return value


@cache
def cpu_matmul_flops(dtype: str = "float32") -> float:
    """Sustained FLOP/s of a 1024x1024 matmul on this machine's CPU (measured for ~0.5 s)."""
    import torch

    a = torch.randn(1024, 1024, dtype=getattr(torch, dtype))
    a @ a  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        a @ a
        n += 1
    return n * 2 * 1024**3 / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- time

# Dense bf16 peak FLOP/s by GPU name (substring of torch.cuda.get_device_name()).
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}
MFU = 0.35
QLORA_SLOWDOWN = 1.3
CPU_EFFICIENCY = 0.5


def gpu_label(cfg: Config) -> str:
    name = _gpu_name(cfg)
    mem = cfg.hardware.gpu_memory_gb
    return f"{name} {mem:g}GB" if mem else name


def _gpu_name(cfg: Config) -> str:
    """The GPU this run is planned for: the one here if there is one, else by hardware.gpu_memory_gb."""
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            here = torch.cuda.get_device_name(0)
            for name in GPU_PEAK_FLOPS:
                if name in here:
                    return name
    mem = cfg.hardware.gpu_memory_gb or 80
    return "H100" if mem >= 80 else ("A100" if mem >= 40 else "A10G")


@dataclass(frozen=True)
class TimeEstimate:
    stage: Stage
    device_label: str
    steps: int | None
    tokens: float | None  # trained tokens over the stage (all devices)
    flops: float | None
    flops_per_second: float  # sustained, all devices together
    seconds: float | None
    budget_seconds: float | None  # this stage's share of hardware.time_limit
    examples_in_budget: int | None = None  # the dataset size (examples, all epochs run) the budget allows
    assumptions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        if self.seconds is None or self.budget_seconds is None:
            return None
        return self.seconds <= self.budget_seconds

    def summary(self) -> str:
        if self.seconds is None:
            fit = (
                f"; the {_hours(self.budget_seconds)} budget allows a dataset of "
                f"~{self.examples_in_budget:,} examples"
                if self.budget_seconds is not None and self.examples_in_budget is not None
                else ""
            )
            return f"{self.stage}: time unknown{fit} ({'; '.join(self.assumptions)})"
        budget = (
            f" of a {_hours(self.budget_seconds)} budget ({'fits' if self.fits else 'DOES NOT FIT'})"
            if self.budget_seconds is not None
            else ""
        )
        return (
            f"{self.stage}: ~{_hours(self.seconds)}{budget}: {self.steps:,} steps, "
            f"{(self.tokens or 0) / 1e6:.1f}M tokens, {self.flops or 0:.2e} FLOPs at "
            f"{self.flops_per_second / 1e12:.1f} TFLOP/s sustained on {self.device_label}"
        )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def stage_budget_seconds(cfg: Config, stage: Stage) -> float | None:
    """hardware.time_limit x the stage's time share, normalised over the enabled stages."""
    limit = cfg.hardware.time_limit_s
    if limit is None:
        return None
    from .stages import registry

    # The stages this run has (the pipeline's enabled training stages), as the pipeline shares the time.
    on = [k for k in registry.order(cfg) if not registry.is_training_stage(k) or cfg.stage(k).enabled]
    return limit * cfg.hardware.share(stage, on) if stage in on else None


def split_stats(cfg: Config, stage: Stage) -> tuple[int, float] | None:
    """(rows, mean tokens) of `<stage>_train` from the data stage's stats.json, if it has run."""
    try:
        stats = json.loads((cfg.output_dir / "data" / "stats.json").read_text())
        split = stats["splits"][f"{stage}_train"]
        return int(split["rows"]), float(split["mean"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def train_flops_per_token(
    shape: ModelShape, cfg: Config, stage: Stage, seq_len: float, checkpointing: bool
) -> float:
    s: StageTrainingConfig = getattr(cfg, stage)
    fwd = 2 * shape.matmul_params + 2 * shape.num_layers * seq_len * shape.q_dim
    if s.method in ("lora", "qlora"):
        mult = 2.0
    elif s.method == "full":
        mult = 3.0
    else:
        n = min(s.freeze_trainable_layers, shape.num_layers)
        share = (
            n * shape.linear_params_per_layer + shape.vocab_size * shape.hidden_size
        ) / shape.matmul_params
        mult = 1.0 + 2.0 * share
    if checkpointing:
        mult += 1.0
    if s.reference_policy() is not None:
        mult += 1.0  # the reference forward: every step (adapter, copy) or once before training (precompute)
    return fwd * mult


def estimate_time(
    cfg: Config,
    stage: Stage,
    *,
    n_examples: int | None = None,
    mean_tokens: float | None = None,
    device: Device | None = None,
    shape: ModelShape | None = None,
) -> TimeEstimate:
    """Wall time of training `stage` (formulas in the module docstring). n_examples and mean_tokens
    (per sequence; DPO: per chosen or rejected sequence) default to the data stage's stats.json when it
    has run; without them a max_steps run is still estimated with max_length tokens per sequence."""
    s: StageTrainingConfig = getattr(cfg, stage)
    shape = shape or ModelShape.from_config(cfg)
    st = _setup(cfg, stage, device, None)
    notes: list[str] = []
    if n_examples is None or mean_tokens is None:
        stats = split_stats(cfg, stage)
        if stats:
            n_examples = stats[0] if n_examples is None else n_examples
            mean_tokens = stats[1] if mean_tokens is None else mean_tokens
    if mean_tokens is None:
        mean_tokens = float(st.seq_len)
        notes.append(f"every sequence assumed max_length ({st.seq_len} tokens): an upper bound")
    per_step = st.batch * s.gradient_accumulation_steps * st.world_size
    if s.max_steps > 0:
        steps: int | None = s.max_steps
    elif n_examples is not None:
        batches = math.ceil(n_examples / (st.batch * st.world_size))
        steps = math.ceil(s.num_train_epochs * math.ceil(batches / s.gradient_accumulation_steps))
    else:
        steps = None
        notes.append("number of examples unknown: run `tunepipe data` first or pass n_examples")

    if st.device == "cuda":
        name = _gpu_name(cfg)
        rate = GPU_PEAK_FLOPS[name] * MFU * st.world_size
        notes.append(
            f"{name} bf16 peak {GPU_PEAK_FLOPS[name] / 1e12:.0f} TFLOP/s x MFU {MFU} x {st.world_size}"
        )
        if cfg.model.load_in_4bit:
            rate /= QLORA_SLOWDOWN
            notes.append(f"QLoRA dequantisation x {QLORA_SLOWDOWN}")
        label = f"{st.world_size} x {gpu_label(cfg)}"
    else:
        rate = cpu_matmul_flops("bfloat16" if st.autocast else "float32") * CPU_EFFICIENCY
        notes.append(f"CPU matmul measured here x {CPU_EFFICIENCY}")
        if cfg.model.load_in_4bit:  # measured on CPU: 1.15x (SmolLM2-135M, bf16 autocast) to 1.9x (tiny)
            rate /= QLORA_SLOWDOWN
            notes.append(f"QLoRA dequantisation x {QLORA_SLOWDOWN}")
        label = "CPU"
    tokens = flops = seconds = None
    per_token = train_flops_per_token(shape, cfg, stage, mean_tokens, st.checkpointing)
    if steps is not None:
        tokens = steps * per_step * st.sequences_per_example * mean_tokens
        flops = tokens * per_token
        seconds = flops / rate
        sampled = s.generated_tokens()
        if sampled:
            # Sampling the completions (GRPO): a forward per generated token of each row, decoding
            # being latency-bound rather than compute-bound.
            gen_flops = steps * per_step * sampled * 2 * shape.matmul_params
            seconds += gen_flops / (rate * GENERATION_EFFICIENCY)
            notes.append(
                f"sampling {sampled} tokens per completion at {GENERATION_EFFICIENCY:.0%} of the training "
                "rate (an assumption: decoding is latency-bound; vLLM on a GPU does better)"
            )
    budget = stage_budget_seconds(cfg, stage)
    in_budget = None
    if budget is not None:
        epochs = 1.0 if s.max_steps > 0 else s.num_train_epochs
        in_budget = int(budget * rate / (per_token * st.sequences_per_example * mean_tokens * epochs))
    return TimeEstimate(
        stage=stage,
        device_label=label,
        steps=steps,
        tokens=tokens,
        flops=flops,
        flops_per_second=rate,
        seconds=seconds,
        budget_seconds=budget,
        examples_in_budget=in_budget,
        assumptions=notes,
    )
