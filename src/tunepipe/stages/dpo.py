"""Stage `dpo`: direct preference optimisation with TRL's DPOTrainer, starting from the previous stage.

The previous stage's adapter is merged into the base weights and a fresh LoRA adapter is trained on
top; with the adapter disabled the same network is the previous model, which is the reference policy
(no second copy). Writes `dpo/adapter/`, `dpo/log.jsonl`. Gate: training started, loss finite and
falling.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from ..config import StageTrainingConfig
from . import StageContext, StageResult
from .registry import Curve, TrainingStage


class DPOSection(StageTrainingConfig):
    """`dpo:` preference tuning on prompt / chosen / rejected pairs."""

    # Not supported: packing would cut preference pairs apart. Present only to say so.
    packing: bool = False

    @field_validator("packing")
    @classmethod
    def _no_packing(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "packing is not supported for DPO (chosen and rejected must stay whole); remove it"
            )
        return v

    per_device_train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(16, ge=1)
    learning_rate: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0)  # higher keeps the policy closer to the reference
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    # > 0 adds the SFT loss on the chosen reply with this weight (RPO): the policy keeps raising the
    # probability of good answers instead of only widening the gap, which protects generation quality.
    sft_weight: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust DPO / cDPO: the chance a label is flipped
    # The reference policy is the model this stage starts from, held as: adapter = the policy with its
    # LoRA adapter disabled (no second copy; LoRA only), precompute = its log-probs computed once before
    # training, copy = a frozen second model (needed for full and freeze); auto = adapter for LoRA,
    # else copy.
    reference: Literal["auto", "adapter", "precompute", "copy"] = "auto"

    @field_validator("reference")
    @classmethod
    def _adapter_needs_lora(cls, v: str, info: ValidationInfo) -> str:
        method = info.data.get("method")
        if v == "adapter" and method not in ("lora", "qlora"):
            raise ValueError(
                f"adapter needs a LoRA method (method is {method}); use reference: copy or precompute"
            )
        return v

    def reference_policy(self) -> str | None:
        return self.resolved_reference()

    def resolved_reference(self) -> str:
        if self.reference != "auto":
            return self.reference
        return "adapter" if self.method in ("lora", "qlora") else "copy"


STAGE = TrainingStage(
    name="dpo",
    module=__name__,
    section=DPOSection,
    data="pairs",
    title="DPO",
    summary="preference tuning on chosen/rejected pairs (TRL DPOTrainer)",
    trainer="trl:DPOTrainer",
    trainer_config="trl:DPOConfig",
    curves=(
        Curve("rewards/accuracies", "reward accuracy"),
        Curve("rewards/margins", "reward margin"),
    ),
    sequences_per_example=2,
    reference_forward=True,
    time_share=0.3,
)


def _loss_kwargs(d: DPOSection) -> dict[str, Any]:
    if d.sft_weight > 0:
        return {"loss_type": [d.loss_type, "sft"], "loss_weights": [1.0, d.sft_weight]}
    return {"loss_type": [d.loss_type]}


def _pair_chars(r: dict[str, Any]) -> int:
    """A length proxy for grouping (characters, no tokenizer pass): prompt plus the longer reply."""

    def chars(msgs: Any) -> int:
        return sum(len(str(m.get("content", ""))) for m in msgs) if isinstance(msgs, list) else len(str(msgs))

    return chars(r["prompt"]) + max(chars(r["chosen"]), chars(r["rejected"]))


def run(ctx: StageContext) -> StageResult:
    from datasets import Dataset

    from ..collators import length_grouped_order
    from ..data.prepare import read_split
    from ..training import frozen_starting_model, run_trainer_stage
    from . import registry

    cfg, d = ctx.cfg, ctx.cfg.dpo
    rows = read_split(ctx.data_dir, "dpo_train")
    if d.group_by_length:
        # Chosen and rejected are padded to the longest of the micro-batch: similar lengths together.
        group = d.per_device_train_batch_size * d.gradient_accumulation_steps
        order = length_grouped_order([_pair_chars(r) for r in rows], group, cfg.training.seed)
        rows = [rows[i] for i in order]
    train = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    reference = d.resolved_reference()
    start = registry.title(registry.previous(cfg, "dpo") or "base")
    ctx.log(f"dpo: method {d.method}, reference policy: the {start} model ({reference})")

    return run_trainer_stage(
        ctx,
        "dpo",
        train,
        f"{len(rows)} pairs",
        config_kwargs={
            "beta": d.beta,
            "label_smoothing": d.label_smoothing,
            "precompute_ref_log_probs": reference == "precompute",
            **_loss_kwargs(d),
        },
        trainer_kwargs=lambda plan: {
            "ref_model": frozen_starting_model(ctx, "dpo", plan) if reference == "copy" else None
        },
        outputs={"reference": reference},
    )
