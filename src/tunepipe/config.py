"""The project config: one pydantic model per section, YAML loading, dotted overrides, and
error messages that name the file, the key and the closest valid key.

Relative paths in a config (data sources, output_dir, chat templates) are resolved against the
directory of the config file, so a project folder can be moved or run from anywhere.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .redaction import redact

if TYPE_CHECKING:
    from .stages.dpo import DPOSection
    from .stages.grpo import GRPOSection
    from .stages.kto import KTOSection
    from .stages.sft import SFTSection


class ConfigError(Exception):
    """A config that cannot be used; the message says where and how to fix it (exit code 2).

    `fields` holds one {"key": dotted key or "", "message": text} per problem found by the schema, so
    that a form (tunepipe ui) can show each message next to its field."""

    def __init__(self, message: str, fields: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.fields = fields or []


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- sections


class ProjectConfig(Section):
    name: str = "tunepipe-project"
    goal: str = ""
    output_dir: str = "runs/default"  # relative to the config file


_DURATION = re.compile(
    r"^\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?"
    r"\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$"
)


def parse_duration(text: str) -> float:
    """'24h', '1h30m', '90m', '60s', '2d' -> seconds."""
    m = _DURATION.match(text)
    if not text.strip() or not m or not any(m.groups()):
        raise ValueError(f"cannot read duration {text!r}; write it like '24h', '1h30m', '90m' or '60s'")
    d, h, mins, secs = (float(g) if g else 0.0 for g in m.groups())
    return d * 86400 + h * 3600 + mins * 60 + secs


class HardwareConfig(Section):
    gpus: int = Field(0, ge=0, description="GPUs per node the run is planned for (0 = CPU)")
    gpu_memory_gb: float | None = Field(None, gt=0)
    # Machines the run spans; each runs the same command (--node-rank, or Slurm's variables).
    nodes: int = Field(1, ge=1, description="machines the run spans")
    # Processes per node: None = one per visible GPU (1 on a CPU-only machine); N on CPU = N processes
    # over gloo. `tunepipe run` launches them itself (torch's elastic launcher).
    processes: int | None = Field(None, ge=1, description="processes per node (default: one per GPU)")
    # How the model is spread over the processes: ddp = a whole copy on each; fsdp = FSDP2 (accelerate);
    # zero2 / zero3 = DeepSpeed ZeRO stage 2 / 3.
    sharding: Literal["ddp", "fsdp", "zero2", "zero3"] = "ddp"
    deepspeed: str | None = None  # the DeepSpeed JSON you launch with (checked against the model settings)
    time_limit: str | None = None  # e.g. "24h": the whole pipeline, per `tunepipe run`
    # How the time left is shared out among the stages still to run (normalised over those).
    # Default: data 0.05, eval 0.12, report 0.03 and each training stage's own share (sft 0.5, dpo 0.3).
    time_shares: dict[str, float] = Field(default_factory=lambda: default_time_shares())

    @field_validator("time_shares")
    @classmethod
    def _known_stages(cls, v: dict[str, float]) -> dict[str, float]:
        from .stages import registry

        names = registry.all_stage_names()
        for k, share in v.items():
            if k not in names:
                close = difflib.get_close_matches(k, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"time_shares: unknown stage {k!r}{hint} (stages: {', '.join(names)})")
            if share < 0:
                raise ValueError(f"time_shares.{k}: a share cannot be negative (got {share})")
        return v

    @field_validator("time_limit")
    @classmethod
    def _check_time_limit(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    @property
    def time_limit_s(self) -> float | None:
        return parse_duration(self.time_limit) if self.time_limit else None

    def share(self, stage: str, among: list[str]) -> float:
        """`stage`'s fraction of the time, its time_shares entry normalised over the stages `among`
        (those still to run, or all enabled ones). The pipeline, planner, doctor and report use this."""
        total = sum(self.time_shares.get(s, 0.0) for s in among)
        return self.time_shares.get(stage, 0.0) / total if total else 0.0


def default_time_shares() -> dict[str, float]:
    from .stages import registry

    stages = {n: s.time_share for n, s in registry.training_stages().items()}
    return {"data": 0.05, **stages, "eval": 0.12, "report": 0.03}


class ModelConfig(Section):
    name_or_path: str = "smollm2-135m-instruct"
    revision: str | None = None
    # auto = flash_attention_2 only when it imports and runs on this GPU, else sdpa.
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    # auto = bf16 on GPUs that support it; fp32 weights on CPU (bf16 autocast where the CPU has bf16).
    # float32 = fp32 throughout, no autocast (on CPU: the way to switch bf16 autocast off).
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    load_in_4bit: bool = False
    # How 4-bit weights are stored: bfloat16 lets ZeRO-3 / FSDP shard them (QLoRA across GPUs).
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16"] = "uint8"
    trust_remote_code: bool = False  # never on unless the user asks: it runs code from the model repo
    chat_template: str | None = None  # a path to a .jinja file, or the template text itself
    enable_thinking: bool | None = None  # passed to templates that know it (Qwen3)


class DataSource(Section):
    path: str  # a file, glob, folder, `save_to_disk` folder or hub dataset id
    format: (
        Literal[
            "auto",
            "messages",
            "sharegpt",
            "prompt_completion",
            "alpaca",
            "text",
            "preference",
            "preference_implicit",
            "sharegpt_preference",
            "unpaired",
        ]
        | None
    ) = None  # None/auto = detected from the first records
    columns: dict[str, str] = Field(default_factory=dict)  # canonical name -> your column
    weight: float = Field(1.0, gt=0)  # <1 samples, >1 repeats the source's rows
    split: str | None = None  # for hub ids and DatasetDict folders (default train)


def _as_sources(v: Any) -> Any:
    if v is None:
        return []
    if isinstance(v, str | dict):
        v = [v]
    return [{"path": s} if isinstance(s, str) else s for s in v]


class StageData(Section):
    train: list[DataSource] = Field(default_factory=list)
    eval: list[DataSource] = Field(default_factory=list)
    eval_split: float | None = Field(None, gt=0, lt=1)

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _normalise_sources(cls, v: Any) -> Any:
        return _as_sources(v)

    @model_validator(mode="after")
    def _one_eval_source(self) -> StageData:
        if self.eval and self.eval_split:
            raise ValueError("set either `eval` (files) or `eval_split` (a fraction of train), not both")
        return self


class DataConfig(Section):
    """Shared data settings; one `StageData` block per registered training stage (`data.sft`,
    `data.dpo`, ...) is added by stages.registry.config_model()."""

    max_length: int = Field(2048, ge=8)
    truncation: Literal["drop", "truncate", "error"] = "drop"
    max_bad_rows: float = Field(0.01, ge=0, description="a fraction (<1) or a count (>=1) of rejected rows")
    train_on: Literal["all", "last"] = "all"  # which assistant turns of a conversation are trained
    seed: int = 0


class TrainingConfig(Section):
    """Defaults shared by the training stages."""

    seed: int = 42
    logging_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    # A complete checkpoint every N optimizer steps: a crash or a stop costs at most N steps.
    save_steps: int | None = Field(50, ge=1)  # None = no intermediate checkpoints
    # The newest complete checkpoints kept (>= 2: the newest complete one survives a crash in the next
    # save), plus the one with the lowest training loss.
    save_total_limit: int = Field(2, ge=2)
    # liger-kernel's Triton kernels (RMSNorm, RoPE, SwiGLU) in the trained model. auto = on with a CUDA
    # GPU when liger-kernel is installed (pip install 'tunepipe[gpu]'); never on CPU. The vocabulary
    # projection stays TRL's fused LM head.
    liger_kernel: Literal["auto"] | bool = "auto"
    # The loss_falling gate (mean loss of the last quarter of logged steps below the first quarter's).
    # auto = checked on runs with 10+ logged steps (shorter ones are per-batch noise); false = off.
    loss_falling_gate: Literal["auto"] | bool = "auto"
    # Experiment trackers the training stages report to (transformers' integrations): tensorboard, wandb,
    # mlflow, trackio, ... [] or none = nowhere. Each writes under the run folder unless its own
    # environment variable says otherwise (WANDB_DIR, MLFLOW_TRACKING_URI, ...). Not a stage input:
    # adding a tracker retrains nothing.
    report_to: list[str] = Field(default_factory=list)

    @field_validator("report_to", mode="before")
    @classmethod
    def _as_tracker_list(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list) and [str(x).lower() for x in v] == ["none"]:
            return []
        return v

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        from .trackers import check_tracker

        for name in v:
            if name == "all":
                raise ValueError(
                    "'all' is not accepted: name the trackers, e.g. [tensorboard, wandb] ('all' would "
                    "report to whatever happens to be installed)"
                )
            if name == "none":
                raise ValueError("'none' cannot be combined with trackers: write none (or []) alone")
            check_tracker(name)
        return list(dict.fromkeys(v))  # once each, in the order given


class LoraConfig(Section):
    r: int = Field(16, ge=1)  # higher adapts more, costs memory and time
    alpha: int = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class StageTrainingConfig(Section):
    enabled: bool = True
    # lora: low-rank adapters; qlora: LoRA on a 4-bit base (model.load_in_4bit); full: every weight
    # (memory: ~16 bytes per parameter with AdamW); freeze: only the last `freeze_trainable_layers`.
    method: Literal["lora", "qlora", "full", "freeze"] = "lora"
    freeze_trainable_layers: int = Field(2, ge=1)  # method: freeze
    lora: LoraConfig = Field(default_factory=LoraConfig)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1 = derived from num_train_epochs")
    learning_rate: float = Field(2e-4, gt=0)
    per_device_train_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    # auto = on for SFT on GPU, off for DPO and on CPU (where memory is plenty and time is short).
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    # Micro-batches of similar lengths (shuffled in groups): far less padding. false = plain shuffling.
    group_by_length: bool = True
    # Project only the loss-bearing positions (replies, not prompts or padding) through the vocabulary.
    # TRL does this on CUDA; on CPU it projects every position. Same loss; false = TRL's choice.
    lm_head_loss_positions_only: bool = True

    # Planner terms: what a step of this stage holds besides the policy's forward and backward. A
    # stage's own section says more where its trainer does more (DPO, KTO, GRPO).
    def reference_policy(self) -> str | None:
        """How the reference policy is held (adapter, precompute, copy), or None without one."""
        return None

    def sequence_tokens(self, max_length: int) -> int:
        """The longest sequence a micro-batch row holds (GRPO: the prompt plus its completion)."""
        return max_length

    def generated_tokens(self) -> int:
        """Tokens sampled per micro-batch row before its forward (GRPO: max_completion_length)."""
        return 0

    @model_validator(mode="after")
    def _check_max_steps(self) -> StageTrainingConfig:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be -1 (use num_train_epochs) or a positive number")
        return self


# Scored on each generated reply against the reference reply of a conversation set.
GENERATION_METRICS = ("exact_match", "contains", "regex_match", "numeric_match", "rouge_l")
# Computed from log-probabilities of the reference reply (assistant tokens only): no generation.
LIKELIHOOD_METRICS = ("loss", "perplexity")
# Computed on preference pairs: log p(chosen) against log p(rejected).
PREFERENCE_METRICS = ("preference_accuracy", "reward_margin")
BUILTIN_METRICS = GENERATION_METRICS + LIKELIHOOD_METRICS + PREFERENCE_METRICS
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SCORER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _check_metric(name: str) -> str:
    if name in BUILTIN_METRICS or _SCORER.match(name):
        return name
    close = difflib.get_close_matches(name, BUILTIN_METRICS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ValueError(
        f"unknown metric {name!r}{hint} Built in: {', '.join(BUILTIN_METRICS)}; "
        "or your own scorer as 'module:function' (called as function(prediction, reference) -> float)"
    )


class EvalSet(Section):
    """One held-out set. `source` is a prepared split (<stage>_eval: sft_eval conversations, dpo_eval
    pairs, grpo_eval prompts with answers) or a file/folder in any supported data format (conversations
    or preference pairs, detected)."""

    name: str
    source: str = "sft_eval"
    format: str | None = None  # for file sources, like data sources (None = detected)
    columns: dict[str, str] = Field(default_factory=dict)
    metrics: list[str] | None = None  # None = eval.metrics, those that apply to this kind of set
    # regex_match: the pattern that extracts the answer from the output (group 1 if it has groups) and,
    # when it matches there too, from the reference; compared after whitespace normalisation.
    regex: str | None = None
    numeric_tolerance: float = Field(1e-6, ge=0)  # numeric_match: |a - b| <= tol (or relative tol)
    max_samples: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _file_safe_name(cls, v: str) -> str:
        # The name becomes part of file names (eval/samples/<model>.<name>.jsonl): checked here, not
        # after the evaluation ran.
        if not _SET_NAME.fullmatch(v) or ".." in v:
            raise ValueError(
                f"eval set name {v!r} must be letters, digits, '_', '-' or '.' (no '/', no '..'): "
                "it names the set's sample files"
            )
        return v

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str] | None) -> list[str] | None:
        return [_check_metric(m) for m in v] if v is not None else None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"regex {v!r} does not compile: {e}") from None
        return v

    @model_validator(mode="after")
    def _regex_needed(self) -> EvalSet:
        if self.metrics and "regex_match" in self.metrics and not self.regex:
            raise ValueError(f"eval set {self.name!r}: regex_match needs `regex` (the answer pattern)")
        return self


class LmEvalConfig(Section):
    """Benchmarks through lm-evaluation-harness (`pip install lm-eval`)."""

    tasks: list[str] = Field(min_length=1)
    limit: float | None = Field(None, gt=0)  # examples per task (a fraction if < 1)
    num_fewshot: int | None = Field(None, ge=0)
    include_path: str | None = None  # a folder of task YAMLs: local tasks work offline
    batch_size: int = Field(8, ge=1)


class EvalConfig(Section):
    # base and the trained stages' models, in pipeline order. Default: base and every trained stage.
    models: list[str] = Field(default_factory=list)
    # A set is a prepared split name (sft_eval, dpo_eval, grpo_eval) or {name, source, metrics, ...}.
    # Default: the held-out split of every trained stage that has one to score.
    sets: list[EvalSet] = Field(default_factory=list)
    # The default metrics of sets that list none; each set uses those that apply to its kind.
    metrics: list[str] = Field(default_factory=lambda: ["exact_match", "loss", "preference_accuracy"])
    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = False  # greedy by default: reproducible scores
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0  # for sampling
    strip_thinking: bool = True  # remove <think>...</think> from outputs before scoring
    batch_size: int = Field(16, ge=1)
    max_samples: int | None = Field(None, ge=1)  # per set, unless the set says otherwise
    lm_eval: LmEvalConfig | None = None

    @field_validator("sets", mode="before")
    @classmethod
    def _named_sets(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": s, "source": s} if isinstance(s, str) else s for s in v]
        return v

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        return [_check_metric(m) for m in v]

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        names = [s.name for s in self.sets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"eval.sets: names must be unique, repeated: {', '.join(sorted(dup))}")
        return self


class ReportConfig(Section):
    title: str | None = None
    plots: bool = True


class Config(Section):
    """The whole config. load_config validates with stages.registry.config_model(), this class plus one
    section per registered training stage (`sft:`, `dpo:`, `grpo:`, `kto:`, yours)."""

    project: ProjectConfig = Field(default_factory=ProjectConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    # The training stages in order; each starts from the previous one's result (the first from the
    # base model): [sft, dpo], [sft, grpo], [sft, dpo, grpo], [sft, kto], ...
    pipeline: list[str] = Field(default_factory=lambda: ["sft", "dpo"])
    # Your own stage modules (importable names; the config's folder is searched first): each defines
    # STAGE (a stages.registry.TrainingStage) and run(ctx), and its name can then go in `pipeline`.
    plugins: list[str] = Field(default_factory=list)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    # Where relative paths are anchored; set by load_config, not part of the YAML.
    _base_dir: Path = Path(".")
    _source: str = "<defaults>"
    _overrides: list[str] = []  # the command line's KEY=VALUE items: launched processes load the same config

    if TYPE_CHECKING:  # the built-in stages' sections, added by stages.registry.config_model()
        sft: SFTSection
        dpo: DPOSection
        grpo: GRPOSection
        kto: KTOSection

    @field_validator("pipeline")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        from .stages import registry

        names = list(registry.training_stages())
        for s in v:
            if s not in names:
                close = difflib.get_close_matches(s, names, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"unknown training stage {s!r}; {hint}(training stages: {', '.join(names)})")
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"a stage can run once per pipeline; repeated: {', '.join(dup)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        from .stages import registry

        for stage in registry.training_stages():
            method = self.stage(stage).method
            if method == "qlora" and not self.model.load_in_4bit:
                raise ValueError(f"{stage}.method: qlora needs model.load_in_4bit: true")
            if method in ("full", "freeze") and self.model.load_in_4bit:
                raise ValueError(
                    f"{stage}.method: {method} cannot train 4-bit weights; "
                    "set model.load_in_4bit: false or use method: qlora"
                )
        models = registry.model_names(self)
        if not self.eval.models:  # the default: every model this pipeline makes
            self.eval.models = models
        for m in self.eval.models:
            if m in models:
                continue
            if registry.is_training_stage(m):
                why = f"{m}.enabled is false" if m in self.pipeline else f"pipeline does not list {m!r}"
                raise ValueError(f"eval.models lists '{m}' but {why}; remove it from eval.models")
            raise ValueError(f"eval.models: unknown model {m!r}; this pipeline has {', '.join(models)}")
        # Evaluated in pipeline order, whatever order the list was written in (the report's columns).
        self.eval.models = [m for m in models if m in self.eval.models]
        if not self.eval.sets:
            self.eval.sets = [
                EvalSet(name=s.eval_split, source=s.eval_split)
                for s in map(registry.get, registry.trained(self))
                if s.data != "unpaired"  # unpaired feedback has no reference reply to score
            ]
        return self

    def stage(self, name: str) -> StageTrainingConfig:
        """The config section of training stage `name` (cfg.stage("dpo") is cfg.dpo)."""
        return getattr(self, name)

    def path(self, p: str | Path) -> Path:
        """Resolve a path from the config relative to the config file's directory."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self._base_dir / q).resolve()

    @property
    def output_dir(self) -> Path:
        return self.path(self.project.output_dir)

    @property
    def source(self) -> str:
        return self._source

    @property
    def overrides(self) -> list[str]:
        return list(self._overrides)


# --------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """'sft.learning_rate=1e-4' -> (['sft', 'learning_rate'], 0.0001). Values are read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE; write it like sft.learning_rate=1e-4")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads '1e-4' as a string; users mean a number.
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d*\.?\d+(e[-+]?\d+)?", value, re.I):
        value = float(value)
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return raw


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class found by walking `loc` from Config (None if not a model)."""
    from .stages.registry import config_model

    cls: Any = config_model()
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        cls = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            for inner in (cand, *getattr(cand, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    cls = inner
        if cls is None:
            return None
    return cls


def _error_fields(err: ValidationError, message: str) -> list[dict[str, str]]:
    """Each schema error's dotted key with its line of the message (same order as `_format_errors`)."""
    keys = [".".join(str(p) for p in e["loc"]) for e in err.errors()]
    lines = message.splitlines()
    return [{"key": k, "message": line} for k, line in zip(keys, lines, strict=False)]


def _format_errors(err: ValidationError, source: str, overrides: list[str]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?" if close else ""
            where = ".".join(str(p) for p in loc[:-1]) or "top level"
            lines.append(
                f"{source}: unknown key '{dotted}' {hint} "
                f"(valid keys in {where}: {', '.join(valid)})".replace("  ", " ")
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {dotted or 'config'}: {msg} (got {e.get('input')!r})")
    if overrides:
        lines.append(f"command-line overrides applied: {' '.join(overrides)}")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or defaults when path is None), apply KEY=VALUE overrides, validate."""
    overrides = list(overrides or [])
    raw: dict[str, Any] = {}
    source = "<defaults>"
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (create one with `tunepipe init DIR`)")
        source, base = str(p), p.resolve().parent
        try:
            text = p.read_text(encoding="utf-8")
            loaded = yaml.safe_load(text) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x}); save it as UTF-8"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(p, text, e)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (project:, model:, ...)")
        raw = loaded
    raw = apply_overrides(raw, overrides)
    from .stages.registry import config_model, load_plugins

    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
        raise ConfigError(f"{source}: plugins: a list of module names (got {plugins!r})")
    try:
        load_plugins(plugins, base)
    except ValueError as e:
        raise ConfigError(f"{source}: plugins: {e}") from None

    try:
        cfg = config_model().model_validate(raw)
    except ValidationError as e:
        message = _format_errors(e, source, overrides)
        raise ConfigError(message, _error_fields(e, message)) from None
    cfg._base_dir = base
    cfg._source = source
    cfg._overrides = overrides
    # hardware.sharding / hardware.deepspeed rules (sharding.check) need the DeepSpeed JSON: the
    # preflight of run/train/eval and doctor apply them, each naming the fix.
    return cfg


def _yaml_error(path: Path, text: str, e: yaml.YAMLError) -> str:
    """The line the mistake is on. PyYAML notices an unclosed key, quote or bracket only on a later
    line (its problem mark); the construct it was reading started on the line to fix (its context
    mark). Bad indentation is reported where it is."""
    problem, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    ctx = getattr(e, "context", None) or ""
    mark = context if context and ctx.startswith(("while scanning", "while parsing a flow")) else problem
    if mark is None:
        return f"{path}: not valid YAML: {e}"
    lines = text.splitlines()
    shown = lines[mark.line].rstrip() if mark.line < len(lines) else ""
    detail = getattr(e, "problem", None) or str(e)
    return f"{path}:{mark.line + 1}: not valid YAML: {detail}" + (
        f"\n  {mark.line + 1} | {shown}" if shown else ""
    )


def resolved_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config with secrets redacted: config.resolved.yaml, and what the trackers log."""
    return redact(cfg.model_dump(mode="json"))


def dump_resolved(cfg: Config) -> str:
    return yaml.safe_dump(resolved_dict(cfg), sort_keys=False)
