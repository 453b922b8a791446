"""The baseline of the DPO speed benchmark: a plain TRL script written the way TRL's documentation shows it
(AutoModelForCausalLM + AutoTokenizer, load_dataset("json"), DPOConfig, LoraConfig, DPOTrainer, train).

    .venv/bin/python bench/trl_dpo_plain.py --model DIR --data pairs.jsonl --out DIR [--lr 5e-4 ...]

Only the settings both contenders must share are set (batch, accumulation, learning rate, epochs,
max_length, logging, report_to, use_cpu, the LoRA settings); beta and the loss are TRL's defaults
(beta 0.1, loss_type ["sigmoid"]), which are tunepipe's defaults too. Every other value is TRL's default.
In the installed TRL (1.16, transformers 5.24) those are:

- reference handling: no ref_model and a peft_config, so the reference is the same network with the LoRA
  adapter disabled, run forward (no grad) on every batch (precompute_ref_log_probs=False);
- gradient_checkpointing=True, bf16=True (autocast over fp32 weights on CPU; needs use_cpu=True without a
  GPU), disable_dropout=True;
- padding: chosen and rejected rows of a batch are concatenated into one batch of 2 x batch rows, padded
  right to the longest of them; no length grouping; padding_free=False (and disabled in this TRL release);
  pad_to_multiple_of "auto" = none on CPU/GPU; max_length truncation keep_start;
- the loss is on the completion tokens (the chosen / rejected replies), the prompt is not scored;
- optimizer adamw_torch_fused, lr_scheduler linear, warmup 0, weight_decay 0, max_grad_norm 1.0, seed 42.

Like the SFT script, the TrainMeter hook only counts batches and times train(). The last stdout line is
`BENCH_RESULT {json}`.
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
    ap.add_argument("--data", required=True, help="JSONL with prompt / chosen / rejected")
    ap.add_argument("--out", required=True, help="output_dir; the adapter is saved to OUT/adapter")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=4)
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
    from trl import DPOConfig, DPOTrainer

    meter = TrainMeter(started=STARTED).install()

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")

    training_args = DPOConfig(
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
    trainer = DPOTrainer(
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
