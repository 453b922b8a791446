"""Benchmark: where padding-free SFT batches with a block-causal mask pay off on CPU (sdpa), and where
they do not — the measurement behind `sft.padding_free: auto` (off without flash-attn).

    .venv/bin/python bench/padding_free.py [--repeats 2] [--lengths 300,250,120,60 --lengths ...]

One LoRA forward + backward (bf16 autocast, as training on a bf16 CPU) of the embedded SmolLM2-135M on
the same rows laid out two ways: a padded micro-batch (right padding, attention mask) and one
concatenated row with position ids and the block-causal 4-D mask (tunepipe.collators), alternated,
best of --repeats. Default shapes: micro-batches of 4 with much padding (random order) and with little
(length-grouped). Not part of `make bench` (the long rows take minutes); results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

DEFAULT_SHAPES = [
    [300, 250, 120, 60],  # random order: ~40% padding
    [1000, 700, 400, 150],
    [2000, 1400, 800, 300],
    [500, 480, 450, 420],  # length-grouped: ~7% padding
    [2000, 1900, 1850, 1800],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lengths", action="append", help="comma-separated row lengths of one micro-batch")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    shapes = [[int(x) for x in s.split(",")] for s in args.lengths] if args.lengths else DEFAULT_SHAPES

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunepipe.collators import block_causal_mask
    from tunepipe.quickstart.model import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()

    def step(batch: dict) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad()
        return time.perf_counter() - t

    warm = torch.randint(100, 40000, (1, 64))
    step({"input_ids": warm, "labels": warm})  # warm-up
    print(f"{'row lengths':28s} {'padding':>7s} {'padded s':>9s} {'padding-free s':>15s} {'ratio':>6s}")
    for lengths in shapes:
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(100, 40000, (n,), generator=g) for n in lengths]
        width = max(lengths)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        flat_ids = torch.cat(rows)[None]
        pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
        flat = {
            "input_ids": flat_ids,
            "position_ids": pos,
            "attention_mask": block_causal_mask(pos),
            "labels": flat_ids.clone(),
        }
        times: dict[str, list[float]] = {"padded": [], "flat": []}
        for _ in range(args.repeats):  # alternate: machine load hits both alike
            times["padded"].append(step(padded))
            times["flat"].append(step(flat))
        a, b = min(times["padded"]), min(times["flat"])
        share = 1 - sum(lengths) / (width * len(lengths))
        print(f"{','.join(map(str, lengths)):28s} {share:7.0%} {a:9.2f} {b:15.2f} {a / b:5.2f}x", flush=True)
    print("ratio > 1: padding-free with the block mask is faster than the padded batch")


if __name__ == "__main__":
    main()
