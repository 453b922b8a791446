"""Stage `sft`: supervised fine-tuning with TRL's SFTTrainer and a PEFT LoRA adapter.

Reads the prepared `data/sft_train.jsonl` (input_ids + assistant-only labels) and writes
`sft/adapter/`, `sft/log.jsonl`. Gate: training started, loss finite and falling.
"""

from __future__ import annotations

from typing import Any, Literal

from ..config import StageTrainingConfig
from . import StageContext, StageResult
from .registry import TrainingStage


class SFTSection(StageTrainingConfig):
    """`sft:` supervised fine-tuning on conversations (loss on the assistant turns only)."""

    # Pack rows into max_length sequences (best-fit decreasing); each row still attends only to itself.
    packing: bool = False
    # Concatenate each micro-batch into one row without padding (the same rows per step as padded
    # batches). auto = on with flash-attn (varlen kernels); with sdpa/eager it needs a block mask whose
    # attention costs more than the padding it saves on short rows, so auto = off there.
    padding_free: Literal["auto"] | bool = "auto"


STAGE = TrainingStage(
    name="sft",
    module=__name__,
    section=SFTSection,
    data="conversations",
    title="SFT",
    summary="supervised fine-tuning on conversations (TRL SFTTrainer)",
    trainer="trl:SFTTrainer",
    trainer_config="trl:SFTConfig",
    time_share=0.5,
)


def resolve_padding_free(setting: str | bool, attn_implementation: str) -> bool:
    """auto: padding-free only where varlen kernels make it free (flash-attn); see SFTSection."""
    from ..collators import needs_block_mask

    if setting == "auto":
        return not needs_block_mask(attn_implementation)
    return bool(setting)


def run(ctx: StageContext) -> StageResult:
    from datasets import Dataset

    from .. import compat
    from ..collators import BlockCausalMask, length_grouped_order, needs_block_mask
    from ..data.prepare import read_split
    from ..modeling import plan_for
    from ..training import run_trainer_stage

    cfg, s = ctx.cfg, ctx.cfg.sft
    rows = read_split(ctx.data_dir, "sft_train")
    attn = plan_for(cfg.model).attn_implementation
    padding_free = resolve_padding_free(s.padding_free, attn)
    flat = padding_free or s.packing  # one row per micro-batch, sequences told apart by position ids
    if s.group_by_length and not flat:
        # Micro-batches of similar lengths pad little (read in this order: trainer_args' sampler).
        group = s.per_device_train_batch_size * s.gradient_accumulation_steps
        order = length_grouped_order([len(r["input_ids"]) for r in rows], group, cfg.training.seed)
        rows = [rows[i] for i in order]
    # Only the tokenized columns: SFTTrainer sees input_ids and uses our labels as they are.
    train = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])

    from trl import SFTConfig

    own: dict[str, Any] = {"packing": s.packing, "padding_free": padding_free}
    if flat:
        ctx.log(
            f"sft: {'packing' if s.packing else 'padding-free batches'}"
            + (" with a block-causal mask (sdpa/eager)" if needs_block_mask(attn) else "")
        )
        # Concatenated rows have no padding to group by; rows are already cut to data.max_length.
        own.update(compat.sampling_kwargs(SFTConfig, "random"))
        if not s.packing:
            own["max_length"] = None

    def block_mask(trainer: Any, _plan: Any) -> None:
        if flat and needs_block_mask(attn):
            trainer.data_collator = BlockCausalMask(trainer.data_collator)

    return run_trainer_stage(
        ctx,
        "sft",
        train,
        f"{len(rows)} conversations",
        config_kwargs=own,
        after_build=block_mask,
        outputs={"train_tokens": sum(len(r["input_ids"]) for r in rows)},
    )
