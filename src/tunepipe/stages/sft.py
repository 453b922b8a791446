"""Stage `sft`: supervised fine-tuning with TRL's SFTTrainer and a PEFT LoRA adapter.

Reads the prepared `data/sft_train.jsonl` (input_ids + assistant-only labels) and writes
`sft/adapter/`, `sft/log.jsonl`. Gate: training started, loss finite and falling.
"""

from __future__ import annotations

from typing import Any

from .. import compat
from ..collators import BlockCausalMask, length_grouped_order, needs_block_mask
from ..data.prepare import read_split
from ..dist import world_size
from ..modeling import (
    apply_fused_kernels,
    freeze_all_but_last_layers,
    load_model,
    load_tokenizer,
    lora_config,
    plan_for,
    uses_lora,
)
from ..training import Training, loss_gate, read_log, save_result, trainer_args
from . import StageContext, StageResult


def resolve_padding_free(setting: str | bool, attn_implementation: str) -> bool:
    """auto: padding-free only where varlen kernels make it free (flash-attn); see config.SFTConfig."""
    if setting == "auto":
        return not needs_block_mask(attn_implementation)
    return bool(setting)


def run(ctx: StageContext) -> StageResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg, out = ctx.cfg, ctx.stage_dir("sft")
    rows = read_split(ctx.data_dir, "sft_train")
    plan = plan_for(cfg.model)
    padding_free = resolve_padding_free(cfg.sft.padding_free, plan.attn_implementation)
    flat = padding_free or cfg.sft.packing  # one row per micro-batch, sequences told apart by position ids
    if cfg.sft.group_by_length and not flat:
        # Micro-batches of similar lengths pad little (read in this order: trainer_args' sampler).
        group = cfg.sft.per_device_train_batch_size * cfg.sft.gradient_accumulation_steps
        order = length_grouped_order([len(r["input_ids"]) for r in rows], group, cfg.training.seed)
        rows = [rows[i] for i in order]
    # Only the tokenized columns: SFTTrainer sees input_ids and uses our labels as they are.
    train = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])

    ctx.log(f"sft: {len(rows)} conversations; {plan.reason}; attention: {plan.attn_reason}")
    tok = load_tokenizer(cfg, log=ctx.log)
    base_args = trainer_args(cfg, "sft", out, plan, SFTConfig, ctx.smoke)
    training = Training(ctx, "sft", out)

    def _model() -> Any:
        model = load_model(cfg, plan, log=ctx.log)
        apply_fused_kernels(model, cfg, plan, log=ctx.log)
        if cfg.sft.method == "freeze":
            n = freeze_all_but_last_layers(model, cfg.sft.freeze_trainable_layers)
            ctx.log(
                f"sft: method freeze: {n:,} trainable parameters "
                f"(last {cfg.sft.freeze_trainable_layers} layers)"
            )
        return model

    if flat:
        ctx.log(
            f"sft: {'packing' if cfg.sft.packing else 'padding-free batches'}"
            + (" with a block-causal mask (sdpa/eager)" if needs_block_mask(plan.attn_implementation) else "")
        )

    def build(batch: int, accum: int) -> Any:
        overrides = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accum}
        if flat:
            # Concatenated rows have no padding to group by; rows are already cut to data.max_length.
            overrides.update(compat.sampling_kwargs(SFTConfig, "random"))
            if not cfg.sft.packing:
                overrides["max_length"] = None
        args = compat.build(
            SFTConfig,
            log=ctx.log,
            packing=cfg.sft.packing,
            padding_free=padding_free,
            **{**base_args, **overrides},
        )
        trainer = compat.build(
            SFTTrainer,
            log=ctx.log,
            model=_model(),
            args=args,
            train_dataset=train,
            processing_class=tok,
            peft_config=lora_config(cfg.sft) if uses_lora(cfg.sft) else None,
            callbacks=training.callbacks,
        )
        if flat and needs_block_mask(plan.attn_implementation):
            trainer.data_collator = BlockCausalMask(trainer.data_collator)
        return trainer

    result = training.run(
        build, base_args["per_device_train_batch_size"], base_args["gradient_accumulation_steps"]
    )
    saved = save_result(training.trainer, out, cfg.sft)

    log_rows = read_log(out / "log.jsonl")
    gates = loss_gate(log_rows, False if ctx.smoke else ctx.cfg.training.loss_falling_gate)
    losses = [r["loss"] for r in log_rows]
    return StageResult(
        summary=f"{result.global_step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        if losses
        else "no steps",
        gates=gates,
        outputs={
            "result": saved,
            "steps": result.global_step,
            "per_device_train_batch_size": training.batch,
            "gradient_accumulation_steps": training.accum,
            "batch_changes": training.batch_changes,
            "world_size": world_size(),
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
            "train_tokens": sum(len(r["input_ids"]) for r in rows),
        },
    )
