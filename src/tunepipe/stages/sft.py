"""Stage `sft`: supervised fine-tuning with TRL's SFTTrainer and a PEFT LoRA adapter.

Reads the prepared `data/sft_train.jsonl` (input_ids + assistant-only labels) and writes
`sft/adapter/`, `sft/log.jsonl`. Gate: training started, loss finite and falling.
"""

from __future__ import annotations

from typing import Any

from .. import compat
from ..data.prepare import read_split
from ..dist import world_size
from ..modeling import (
    freeze_all_but_last_layers,
    load_model,
    load_tokenizer,
    lora_config,
    plan_for,
    uses_lora,
)
from ..training import Training, loss_gate, read_log, save_result, trainer_args
from . import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg, out = ctx.cfg, ctx.stage_dir("sft")
    rows = read_split(ctx.data_dir, "sft_train")
    # Only the tokenized columns: SFTTrainer sees input_ids and uses our labels as they are.
    train = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])

    plan = plan_for(cfg.model)
    ctx.log(f"sft: {len(rows)} conversations; {plan.reason}; attention: {plan.attn_reason}")
    tok = load_tokenizer(cfg, log=ctx.log)
    base_args = trainer_args(cfg, "sft", out, plan, SFTConfig, ctx.smoke)
    training = Training(ctx, "sft", out)

    def _model() -> Any:
        model = load_model(cfg, plan, log=ctx.log)
        if cfg.sft.method == "freeze":
            n = freeze_all_but_last_layers(model, cfg.sft.freeze_trainable_layers)
            ctx.log(
                f"sft: method freeze: {n:,} trainable parameters "
                f"(last {cfg.sft.freeze_trainable_layers} layers)"
            )
        return model

    def build(batch: int, accum: int) -> Any:
        args = compat.build(
            SFTConfig,
            log=ctx.log,
            packing=cfg.sft.packing,
            **{**base_args, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accum},
        )
        return compat.build(
            SFTTrainer,
            log=ctx.log,
            model=_model(),
            args=args,
            train_dataset=train,
            processing_class=tok,
            peft_config=lora_config(cfg.sft) if uses_lora(cfg.sft) else None,
            callbacks=training.callbacks,
        )

    result = training.run(
        build, base_args["per_device_train_batch_size"], base_args["gradient_accumulation_steps"]
    )
    saved = save_result(training.trainer.model, out, cfg.sft)

    log_rows = read_log(out / "log.jsonl")
    gates = loss_gate(log_rows, require_falling=not ctx.smoke)
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
