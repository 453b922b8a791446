"""The baseline of the SFT speed benchmark: a plain TRL script written the way TRL's documentation shows it
(AutoModelForCausalLM + AutoTokenizer, load_dataset("json"), SFTConfig, LoraConfig, SFTTrainer, train).

    .venv/bin/python bench/trl_sft_plain.py --model DIR --data train.jsonl --out DIR [--lr 1e-3 ...]

Only the settings both contenders must share are set (batch, accumulation, learning rate, epochs,
max_length, logging, report_to, use_cpu, the LoRA settings). Every other value is TRL's default, which is
the point of the comparison. In the installed TRL (1.16, transformers 5.24) those defaults are:

- gradient_checkpointing=True (TRL overrides transformers' False; ~20-30% more compute per step);
- bf16=True unless fp16 is set (TRL overrides transformers' False); on CPU that is bf16 autocast over the
  fp32 weights, and it needs use_cpu=True on a machine without a GPU (transformers refuses bf16 otherwise);
- the model is loaded as the checkpoint stores it (transformers 5: dtype "auto"; fp32 for SmolLM2-135M);
- padding: per batch to its longest row, right side, no length grouping (group_by_length=False), random
  order (seeded, seed 42), pad_to_multiple_of "auto" = none on CPU/GPU; padding_free=False; packing=False;
- loss: on every token of a conversational ("messages") dataset: assistant_only_loss=False and
  completion_only_loss only applies to prompt/completion datasets, so system and user turns are trained too;
- optimizer adamw_torch_fused (transformers 5 default), lr_scheduler linear, warmup 0, weight_decay 0,
  max_grad_norm 1.0, dataloader_num_workers 0, SFT loss_type "nll", shuffle_dataset False, seed 42;
- attention: transformers' default for the model (sdpa).

The measurement (bench/_common.py TrainMeter, the same hook the tunepipe contender gets) wraps
Trainer.training_step / Trainer.train to count what is fed and how long train() takes; it changes nothing
the trainer does. The last stdout line is `BENCH_RESULT {json}`.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # end-to-end: imports, model load and dataset preparation included

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from _common import TrainMeter, emit, last_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a local model folder")
    ap.add_argument("--data", required=True, help="JSONL with a 'messages' column")
    ap.add_argument("--out", required=True, help="output_dir; the adapter is saved to OUT/adapter")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    args = ap.parse_args()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    meter = TrainMeter(started=STARTED).install()

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")

    training_args = SFTConfig(
        output_dir=args.out,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        learning_rate=args.lr,
        max_length=args.max_length,
        logging_steps=1,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(str(Path(args.out) / "adapter"))

    emit(
        meter.result(
            last_loss(trainer.state.log_history),
            contender="trl",
            gradient_checkpointing=training_args.gradient_checkpointing,
            bf16=training_args.bf16,
            adapter=str(Path(args.out) / "adapter"),
        )
    )


if __name__ == "__main__":
    main()
