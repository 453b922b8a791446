"""Stage `grpo`: reinforcement learning with verifiable rewards, TRL's GRPOTrainer.

Reads `data/grpo_train.jsonl` (a prompt and its reference answer per row), samples
`num_generations` completions per prompt, scores them with the configured rewards and trains a fresh
LoRA adapter on the previous stage's result (the adapter-disabled model is the KL reference).
Writes `grpo/adapter/`, `grpo/log.jsonl` (each reward's mean and std, KL, completion length, clip
ratio per step). Gate: training started, loss finite.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import Section, StageTrainingConfig
from . import StageContext, StageResult
from .registry import Curve, TrainingStage

# tunepipe's metrics as rewards (prediction against the row's reference answer), the format rewards,
# or your own `module:function` with TRL's signature.
BUILTIN_REWARDS = ("exact_match", "numeric_match", "regex_match", "contains", "rouge_l", "format", "length")


class Reward(Section):
    """One reward function and its weight in the sum."""

    name: str  # a built-in (see BUILTIN_REWARDS) or "module:function" (TRL's reward signature)
    weight: float = 1.0
    # regex_match: the answer pattern (group 1 if it has groups); format: the pattern a completion must
    # match from its start, e.g. '<think>.*?</think>\\s*\\S+'.
    pattern: str | None = None
    tolerance: float = Field(1e-6, ge=0)  # numeric_match
    # length: 0 up to `target` characters, then falling linearly to -1 at 2 x target.
    target: int = Field(64, ge=1)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        import re

        if v in BUILTIN_REWARDS or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            return v
        import difflib

        close = difflib.get_close_matches(v, BUILTIN_REWARDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown reward {v!r}{hint} Built in: {', '.join(BUILTIN_REWARDS)}; or your own "
            "'module:function' called as function(prompts, completions, **columns) -> list[float]"
        )

    @model_validator(mode="after")
    def _pattern_needed(self) -> Reward:
        if self.name in ("regex_match", "format") and not self.pattern:
            raise ValueError(f"reward {self.name} needs `pattern`")
        return self


class GRPOSection(StageTrainingConfig):
    """`grpo:` RL with verifiable rewards on prompts with reference answers."""

    rewards: list[Reward] = Field(default_factory=lambda: [Reward(name="exact_match")], min_length=1)
    num_generations: int = Field(4, ge=2)  # completions per prompt: the group their rewards are compared in
    max_completion_length: int = Field(64, ge=1)  # tokens per sampled completion
    temperature: float = Field(1.0, gt=0)  # sampling: too low and a group's completions are all alike
    top_p: float = Field(1.0, gt=0, le=1)
    # TRL's loss aggregation (dapo: per active token of the accumulated batch; grpo: per sequence).
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"] = "dapo"
    # KL penalty towards the model this stage starts from (its adapter disabled: no second copy);
    # 0 = no reference pass (faster; TRL's default).
    beta: float = Field(0.0, ge=0)
    epsilon: float = Field(0.2, gt=0)  # the clipping range of the policy ratio
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # Generation: transformers by default; vLLM (colocated on the GPU) when auto finds it installed
    # with a CUDA GPU, or true.
    use_vllm: Literal["auto"] | bool = "auto"
    # Micro-batch and accumulation count completions, not prompts: prompts per optimizer step =
    # per_device_train_batch_size * gradient_accumulation_steps * processes / num_generations.
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    group_by_length: bool = False  # prompts are drawn as they come; groups are formed per prompt

    def reference_policy(self) -> str | None:
        # beta > 0: the KL term needs the starting model's log-probs (LoRA: the adapter disabled).
        if self.beta == 0:
            return None
        return "adapter" if self.method in ("lora", "qlora") else "copy"

    def sequence_tokens(self, max_length: int) -> int:
        return max_length + self.max_completion_length  # data.max_length bounds the prompt

    def generated_tokens(self) -> int:
        return self.max_completion_length

    @model_validator(mode="after")
    def _whole_groups(self) -> GRPOSection:
        per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if per_step % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size x gradient_accumulation_steps ({per_step}) must be a multiple "
                f"of num_generations ({self.num_generations}): each optimizer step compares whole groups"
            )
        return self


STAGE = TrainingStage(
    name="grpo",
    module=__name__,
    section=GRPOSection,
    data="prompts",
    title="GRPO",
    summary="RL with verifiable rewards on prompts with answers (TRL GRPOTrainer)",
    trainer="trl:GRPOTrainer",
    trainer_config="trl:GRPOConfig",
    curves=(
        Curve("reward", "reward"),
        Curve("kl", "KL"),
        Curve("completions/mean_length", "completion length"),
        Curve("clip_ratio/region_mean", "clip ratio"),
    ),
    loss_falls=False,
    generates=True,
    time_share=0.3,
)


def resolve_use_vllm(setting: str | bool) -> bool:
    """auto: vLLM when it is installed and a CUDA GPU is visible (it generates only on GPUs)."""
    if setting != "auto":
        return bool(setting)
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


# Dataset columns TRL reads as something else than a reward column (images: a vision-language batch).
_NOT_COLUMNS = ("messages", "image", "images")


def run(ctx: StageContext) -> StageResult:
    from datasets import Dataset

    from ..data.chat import template_kwargs
    from ..data.prepare import read_split
    from ..modeling import uses_lora
    from ..rewards import reward_functions, reward_weights
    from ..training import frozen_starting_model, run_trainer_stage

    cfg, g = ctx.cfg, ctx.cfg.grpo
    rows = read_split(ctx.data_dir, "grpo_train")
    # The prompt, its answer and any other column: each reaches the reward functions as a keyword
    # (`messages` only repeats prompt + answer).
    train = Dataset.from_list([{k: v for k, v in r.items() if k not in _NOT_COLUMNS} for r in rows])
    base_dir = cfg.path(".")
    # Built (user modules imported) now: a bad reward fails before the model loads.
    reward_funcs = reward_functions(g.rewards, base_dir)

    use_vllm = resolve_use_vllm(g.use_vllm)
    if use_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(
                "grpo.use_vllm: true needs vLLM (pip install vllm) and a CUDA GPU; or use_vllm: auto"
            )
        ctx.log("grpo: generation with vLLM colocate (on the training GPU)")
    else:
        import torch

        ctx.log(f"grpo: generation with transformers on {'CUDA' if torch.cuda.is_available() else 'CPU'}")
    # A smoke run trains micro-batches of 2 without accumulation: one group of 2 completions per step.
    generations = 2 if ctx.smoke else g.num_generations
    own: dict[str, Any] = {
        "num_generations": generations,
        "max_completion_length": g.max_completion_length,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "loss_type": g.loss_type,
        "beta": g.beta,
        "epsilon": g.epsilon,
        "scale_rewards": g.scale_rewards,
        "reward_weights": reward_weights(g.rewards),
        # Prompts rendered as SFT and eval render them (Qwen3's thinking switch).
        "chat_template_kwargs": template_kwargs(cfg.model.enable_thinking) or None,
        "use_vllm": use_vllm,
        # TRL's rich table and parquet files per step; the log has the rewards.
        "log_completions": False,
    }
    if use_vllm:
        own.update(vllm_mode="colocate", vllm_max_model_length=cfg.data.max_length + g.max_completion_length)

    def after_build(trainer: Any, plan: Any) -> None:
        # GRPO counts prompt and completion tokens itself (state.num_input_tokens_seen, as it generates);
        # the Trainer's own count looks for input_ids in the raw prompt rows and warns at every step.
        trainer._track_num_input_tokens = lambda inputs: None
        if g.beta > 0 and not uses_lora(g):
            # Without an adapter to disable, TRL loads the reference again from the policy's
            # config._name_or_path: the base weights, not the previous stage's merged result.
            _replace_reference(trainer, frozen_starting_model(ctx, "grpo", plan))

    return run_trainer_stage(
        ctx,
        "grpo",
        train,
        f"{len(rows)} prompts, {generations} completions each",
        config_kwargs=own,
        trainer_kwargs=lambda plan: {"reward_funcs": reward_funcs},
        after_build=after_build,
        outputs={
            "rewards": [f.__name__ for f in reward_funcs],
            "generation": "vllm" if use_vllm else "transformers",
        },
    )


def _replace_reference(trainer: Any, ref: Any) -> None:
    """The reference policy = `ref` (frozen), prepared the way GRPOTrainer prepares its own."""
    from trl.trainer.utils import add_fused_lm_head

    ref.eval()
    for p in ref.parameters():
        p.requires_grad = False
    trainer.ref_model = None  # TRL's copy goes before the next is placed
    add_fused_lm_head(
        ref, temperature=trainer.temperature, cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32
    )
    if trainer.is_deepspeed_enabled:
        from trl.models import prepare_deepspeed

        ref = prepare_deepspeed(ref, trainer.accelerator)
    elif trainer.is_fsdp_enabled:
        from trl.models import prepare_fsdp

        ref = prepare_fsdp(ref, trainer.accelerator)
    else:
        ref = trainer.accelerator.prepare_model(ref, evaluation_mode=True)
    trainer.ref_model = ref
