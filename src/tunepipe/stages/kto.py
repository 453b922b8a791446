"""Stage `kto`: Kahneman-Tversky optimisation on unpaired feedback, TRL's KTOTrainer.

Reads `data/kto_train.jsonl` (a prompt, one completion and a boolean label: thumbs up or down;
preference pairs are split into a desirable and an undesirable row) and trains a fresh LoRA adapter
on the previous stage's result (the adapter-disabled model is the reference; methods full and freeze
get a frozen copy). Writes `kto/adapter/` (or `kto/model/`), `kto/log.jsonl` with TRL's KTO metrics
(kl, rewards/chosen|rejected|margins, logps/...). Gate: training started, loss finite and falling.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..config import StageTrainingConfig
from . import StageContext, StageResult
from .registry import Curve, TrainingStage


class KTOSection(StageTrainingConfig):
    """`kto:` preference tuning on unpaired good/bad completions."""

    per_device_train_batch_size: int = Field(4, ge=2)  # KTO's KL estimate needs >= 2 rows per micro-batch
    gradient_accumulation_steps: int = Field(4, ge=1)
    learning_rate: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0)  # higher keeps the policy closer to the reference
    # Weights of the desirable and undesirable rows' losses: raise the rarer side's so that
    # weight x count is about equal (KTO paper: ratio within 1 to 4/3).
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    # TRL reads KTO rows in order: false = a seeded shuffle, true = seeded length groups.
    group_by_length: bool = False

    def reference_policy(self) -> str | None:
        # LoRA: the policy with its adapter disabled; full / freeze: a frozen copy (as the stage does).
        return "adapter" if self.method in ("lora", "qlora") else "copy"


STAGE = TrainingStage(
    name="kto",
    module=__name__,
    section=KTOSection,
    data="unpaired",
    title="KTO",
    summary="preference tuning on unpaired good/bad completions (TRL KTOTrainer)",
    trainer="trl:KTOTrainer",
    trainer_config="trl:KTOConfig",
    curves=(Curve("rewards/margins", "reward margin"), Curve("kl", "KL")),
    reference_forward=True,
    min_micro_batch=2,
    time_share=0.3,
)


def _row_chars(r: dict[str, Any]) -> int:
    """A length proxy for grouping (characters, no tokenizer pass): prompt plus completion."""
    return sum(len(str(m.get("content", ""))) for m in [*r["prompt"], *r["completion"]])


def _weight_hint(d: KTOSection, desirable: int, undesirable: int) -> str | None:
    """The KTO paper's advice (its eq. 8, which TRL checks too) when the two sides are unbalanced:
    desirable_weight x desirable rows / (undesirable_weight x undesirable rows) within 1 to 4/3."""
    if not desirable or not undesirable:
        return None
    ratio = d.desirable_weight * desirable / (d.undesirable_weight * undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    low = undesirable * d.undesirable_weight / desirable
    return (
        f"kto: weighted desirable:undesirable = {ratio:.2f} (the KTO paper keeps it within 1 to 1.33); "
        f"consider kto.desirable_weight in [{low:.2f}, {low * 4 / 3:.2f}]"
    )


def run(ctx: StageContext) -> StageResult:
    import random

    from datasets import Dataset
    from trl import KTOConfig

    from .. import compat
    from ..collators import length_grouped_order
    from ..data.prepare import read_split
    from ..modeling import uses_lora
    from ..training import frozen_starting_model, run_trainer_stage
    from . import registry

    cfg, d = ctx.cfg, ctx.cfg.kto
    rows = read_split(ctx.data_dir, "kto_train")
    # KTOTrainer reads the rows in order (its KL estimate pairs each prompt with the completion of its
    # micro-batch neighbour, fixed when the data is tokenized), so the order is made here: length groups
    # or a seeded shuffle. Unshuffled, the two halves of a split pair would sit side by side and the
    # "mismatched" completion would be an answer to the same prompt.
    group = d.per_device_train_batch_size * d.gradient_accumulation_steps
    if d.group_by_length:
        order = length_grouped_order([_row_chars(r) for r in rows], group, cfg.training.seed)
    else:
        order = list(range(len(rows)))
        random.Random(cfg.training.seed).shuffle(order)
    rows = [rows[i] for i in order]
    train = Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "label")} for r in rows])

    desirable = sum(bool(r["label"]) for r in rows)
    undesirable = len(rows) - desirable
    ctx.log(f"kto: {desirable} desirable, {undesirable} undesirable completions")
    hint = _weight_hint(d, desirable, undesirable)
    if hint:
        ctx.log(hint)
    # LoRA: the policy with its adapter disabled is the starting model (no second copy); full and freeze
    # train every (or the last) weights in place, so they need a frozen copy.
    reference = "adapter" if uses_lora(d) else "copy"
    start = registry.title(registry.previous(cfg, "kto") or "base")
    ctx.log(f"kto: method {d.method}, reference policy: the {start} model ({reference})")

    return run_trainer_stage(
        ctx,
        "kto",
        train,
        f"{len(rows)} completions ({desirable} desirable, {undesirable} undesirable)",
        config_kwargs={
            "beta": d.beta,
            "desirable_weight": d.desirable_weight,
            "undesirable_weight": d.undesirable_weight,
            # TRL refuses any other sampler for the KTO loss (see above); trainer_args chose random.
            **compat.sampling_kwargs(KTOConfig, "sequential"),
        },
        trainer_kwargs=lambda plan: {
            "ref_model": frozen_starting_model(ctx, "kto", plan) if reference == "copy" else None
        },
        outputs={"reference": reference, "desirable": desirable, "undesirable": undesirable},
    )
