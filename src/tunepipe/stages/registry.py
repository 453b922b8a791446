"""The training stages tunepipe knows, one entry per stage module, and the stage order of a config.

Everything that depends on which training stages exist reads this table: the config (one section and
one `data.<stage>` block per stage, the `pipeline:` order), the pipeline (fingerprints, skipping,
time shares), data preparation (what each stage trains on), eval (one model per trained stage), the
report (each stage's curves), the planner and doctor (memory terms), init, the CLI's stage choices,
chat and export (the chain of adapters). Adding a stage = one module that defines `STAGE` and
`run(ctx)`, plus one line in `_BUILTIN` (or `register(STAGE)` from your own code, before the config
is loaded).

Importing this module imports each stage module's declarations only (pydantic sections, no torch):
the pipeline checks fingerprints without loading a model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..config import Config, StageTrainingConfig

# What a training stage reads from the data stage (data/<stage>_train.jsonl, <stage>_eval.jsonl):
#   conversations  input_ids + assistant-only labels (+ the messages)       SFT
#   pairs          prompt / chosen / rejected messages                       DPO
#   prompts        a prompt (messages) and its reference answer              GRPO
#   unpaired       prompt / completion messages and a boolean label          KTO
DataKind = Literal["conversations", "pairs", "prompts", "unpaired"]
DATA_KINDS: tuple[str, ...] = ("conversations", "pairs", "prompts", "unpaired")
# The stages around the training stages; their order never changes.
FIRST, LAST = ("data",), ("eval", "report")


@dataclass(frozen=True)
class Curve:
    """A logged metric (a key of the stage's log.jsonl) and how the report and summary name it."""

    key: str
    label: str


@dataclass(frozen=True)
class TrainingStage:
    name: str  # the config section, the run folder's <name>/, the eval model's name
    module: str  # the module whose run(ctx) trains it
    section: type[StageTrainingConfig]  # the pydantic model of the `<name>:` config section
    data: DataKind  # what it trains on
    title: str  # "SFT", "DPO": how the report, the console and --help name it
    summary: str  # one line: what it does
    trainer: str  # TRL's trainer, "module:Class"
    trainer_config: str  # TRL's config class, "module:Class"
    # Logged per step besides the loss (log.jsonl keys): shown by the report as curves; the first
    # one's last value is in the stage's summary.
    curves: tuple[Curve, ...] = ()
    # The loss_falling gate applies (it does not for RL, whose loss is not a progress measure).
    loss_falls: bool = True
    # Planner terms: sequences scored per example (DPO: chosen and rejected), a reference forward per
    # step (DPO, KTO), completions generated per prompt (GRPO: num_generations).
    sequences_per_example: int = 1
    reference_forward: bool = False
    generates: bool = False
    # The smallest micro-batch its trainer accepts: the out-of-memory guard halves down to it, no lower.
    min_micro_batch: int = 1
    # A default share of hardware.time_limit (normalised with data 0.05, eval 0.12, report 0.03).
    time_share: float = 0.3
    # Packages its run needs beyond the core (pip name -> why); checked by the preflight.
    packages: dict[str, str] = field(default_factory=dict)

    def trainer_classes(self) -> tuple[Any, Any]:
        """(TRL config class, TRL trainer class), imported now (this imports TRL)."""
        return _load(self.trainer_config), _load(self.trainer)

    @property
    def eval_split(self) -> str:
        return f"{self.name}_eval"

    @property
    def train_split(self) -> str:
        return f"{self.name}_train"


def _load(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


# The stage modules shipped with tunepipe, in the order their sections appear in a resolved config.
_BUILTIN = ("tunepipe.stages.sft", "tunepipe.stages.dpo", "tunepipe.stages.grpo", "tunepipe.stages.kto")
_STAGES: dict[str, TrainingStage] = {}
_LOADED = False


def _ensure() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in _BUILTIN:
            register(importlib.import_module(mod).STAGE)


def register(stage: TrainingStage) -> TrainingStage:
    """Add (or replace) a training stage. Config loading, the pipeline and everything else see it
    from the next config loaded on."""
    _ensure()
    reserved = {*FIRST, *LAST, "base", "pipeline"}
    if stage.name in reserved or not stage.name.isidentifier():
        raise ValueError(f"stage name {stage.name!r}: not an identifier, or reserved ({sorted(reserved)})")
    if stage.data not in DATA_KINDS:
        raise ValueError(f"stage {stage.name!r}: data {stage.data!r} is not one of {', '.join(DATA_KINDS)}")
    _STAGES[stage.name] = stage
    return stage


def load_plugins(modules: list[str], base_dir: Path) -> None:
    """Import the config's `plugins` (the config's folder searched first, like scorer modules) and
    register the STAGE each defines. ValueError naming the module when one cannot be used."""
    from ..usercode import import_user_module

    for name in modules:
        module = import_user_module(name, base_dir, "plugin")
        stage = getattr(module, "STAGE", None)
        if not isinstance(stage, TrainingStage):
            raise ValueError(f"{name!r} defines no STAGE (a tunepipe.stages.registry.TrainingStage)")
        if not callable(getattr(module, "run", None)):
            raise ValueError(f"{name!r} has no run(ctx) function")
        register(stage)


def unregister(name: str) -> None:
    _ensure()
    _STAGES.pop(name, None)


def training_stages() -> dict[str, TrainingStage]:
    """Every registered training stage, by name."""
    _ensure()
    return dict(_STAGES)


def get(name: str) -> TrainingStage:
    stages = training_stages()
    if name not in stages:
        raise KeyError(f"no training stage {name!r}; known: {', '.join(stages)}")
    return stages[name]


def is_training_stage(name: str) -> bool:
    return name in training_stages()


def all_stage_names() -> list[str]:
    """data, every registered training stage, eval, report: the names a stage folder can have."""
    return [*FIRST, *training_stages(), *LAST]


def prepared_sets() -> tuple[str, ...]:
    """The held-out splits the data stage can write (<stage>_eval), usable as eval set sources."""
    return tuple(s.eval_split for s in training_stages().values())


# --------------------------------------------------------------------------- a config's order


def trained(cfg: Config) -> list[str]:
    """The training stages this config runs, in pipeline order (those with enabled: false left out)."""
    return [s for s in cfg.pipeline if cfg.stage(s).enabled]


def order(cfg: Config) -> list[str]:
    """Every stage of the run in order, disabled training stages included (they show as disabled)."""
    return [*FIRST, *cfg.pipeline, *LAST]


def previous(cfg: Config, name: str) -> str | None:
    """The trained stage `name` starts from (None: the base model)."""
    chain = trained(cfg)
    before = chain[: chain.index(name)] if name in chain else chain
    return before[-1] if before else None


def chain(cfg: Config, which: str) -> list[str]:
    """The trained stages whose results make up model `which` ("base" or a stage), in order."""
    if which == "base":
        return []
    stages = trained(cfg)
    if which not in stages:
        raise KeyError(f"stage {which!r} is not trained by this config (pipeline: {', '.join(stages)})")
    return stages[: stages.index(which) + 1]


def model_names(cfg: Config) -> list[str]:
    """The models a run has: base, then one per trained stage in order."""
    return ["base", *trained(cfg)]


def title(name: str) -> str:
    if name == "base":
        return "base"
    stages = training_stages()
    return stages[name].title if name in stages else name


# --------------------------------------------------------------------------- config classes


@cache
def _config_models(names: tuple[str, ...], sections: tuple[type, ...]) -> tuple[type, type]:
    from pydantic import Field, create_model

    from ..config import Config, DataConfig, StageData

    data_cls = create_model(  # type: ignore[call-overload]
        "DataConfig",
        __base__=DataConfig,
        __module__=DataConfig.__module__,
        **{n: (StageData, Field(default_factory=StageData)) for n in names},
    )
    cfg_cls = create_model(  # type: ignore[call-overload]
        "Config",
        __base__=Config,
        __module__=Config.__module__,
        data=(data_cls, Field(default_factory=data_cls)),
        **{n: (s, Field(default_factory=s)) for n, s in zip(names, sections, strict=True)},
    )
    return cfg_cls, data_cls


def config_model() -> type[Config]:
    """The Config class with one section (and one data.<stage> block) per registered stage."""
    stages = training_stages()
    return _config_models(tuple(stages), tuple(s.section for s in stages.values()))[0]
