"""Stage `dpo`: direct preference optimisation with TRL's DPOTrainer, starting from the SFT result.

The SFT adapter is merged into the base weights and a fresh LoRA adapter is trained on top; with the
adapter disabled the same network is the SFT model, which is the reference policy (no second copy).
Writes `dpo/adapter/`, `dpo/log.jsonl`. Gate: training started, loss finite and falling.
"""

from __future__ import annotations

from typing import Any

from .. import compat
from ..collators import length_grouped_order
from ..config import DPOConfig as DPOSection
from ..data.prepare import read_split
from ..dist import world_size
from ..modeling import (
    apply_fused_kernels,
    freeze_all_but_last_layers,
    load_stage_model,
    load_tokenizer,
    lora_config,
    plan_for,
    uses_lora,
)
from ..training import Training, loss_gate, read_log, save_result, trainer_args
from . import StageContext, StageResult


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
    from trl import DPOConfig, DPOTrainer

    cfg, out = ctx.cfg, ctx.stage_dir("dpo")
    rows = read_split(ctx.data_dir, "dpo_train")
    d = cfg.dpo
    if d.group_by_length:
        # Chosen and rejected are padded to the longest of the micro-batch: similar lengths together.
        group = d.per_device_train_batch_size * d.gradient_accumulation_steps
        order = length_grouped_order([_pair_chars(r) for r in rows], group, cfg.training.seed)
        rows = [rows[i] for i in order]
    train = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    plan = plan_for(cfg.model)
    ctx.log(f"dpo: {len(rows)} pairs; {plan.reason}; attention: {plan.attn_reason}")
    tok = load_tokenizer(cfg, log=ctx.log)
    base_args = trainer_args(cfg, "dpo", out, plan, DPOConfig, ctx.smoke)
    training = Training(ctx, "dpo", out)

    reference = d.reference if d.reference != "auto" else ("adapter" if uses_lora(d) else "copy")
    ctx.log(f"dpo: method {d.method}, reference policy: the SFT model ({reference})")

    def _policy() -> Any:
        model = load_stage_model(cfg, plan, ctx.run_dir, "sft", log=ctx.log)
        apply_fused_kernels(model, cfg, plan, log=ctx.log)
        if d.method == "freeze":
            freeze_all_but_last_layers(model, d.freeze_trainable_layers)
        return model

    def _frozen_sft() -> Any:
        ref = load_stage_model(cfg, plan, ctx.run_dir, "sft", log=ctx.log).eval()
        apply_fused_kernels(ref, cfg, plan, log=lambda _m: None)
        for p in ref.parameters():
            p.requires_grad = False
        return ref

    def build(batch: int, accum: int) -> Any:
        args = compat.build(
            DPOConfig,
            log=ctx.log,
            beta=d.beta,
            label_smoothing=d.label_smoothing,
            precompute_ref_log_probs=reference == "precompute",
            **_loss_kwargs(d),
            **{**base_args, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accum},
        )
        return compat.build(
            DPOTrainer,
            log=ctx.log,
            # A fresh SFT model per build: the trainer wraps it with a new LoRA adapter.
            model=_policy(),
            ref_model=_frozen_sft() if reference == "copy" else None,
            args=args,
            train_dataset=train,
            processing_class=tok,
            peft_config=lora_config(d) if uses_lora(d) else None,
            callbacks=training.callbacks,
        )

    result = training.run(
        build, base_args["per_device_train_batch_size"], base_args["gradient_accumulation_steps"]
    )
    saved = save_result(training.trainer, out, d)

    log_rows = read_log(out / "log.jsonl")
    gates = loss_gate(log_rows, False if ctx.smoke else ctx.cfg.training.loss_falling_gate)
    losses = [r["loss"] for r in log_rows]
    acc = [r["rewards/accuracies"] for r in log_rows if "rewards/accuracies" in r]
    return StageResult(
        summary=(
            f"{result.global_step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            + (f", reward accuracy (last) {acc[-1]:.2f}" if acc else "")
        )
        if losses
        else "no steps",
        gates=gates,
        outputs={
            "result": saved,
            "reference": reference,
            "per_device_train_batch_size": training.batch,
            "gradient_accumulation_steps": training.accum,
            "batch_changes": training.batch_changes,
            "world_size": world_size(),
            "base": ["sft/adapter"],
            "steps": result.global_step,
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        },
    )
