"""Benchmark: batched generation (what the eval stage does) against one prompt at a time, on the
embedded SmolLM2-135M-Instruct with the quickstart's held-out prompts.

    make bench                      # or: .venv/bin/python bench/generation.py [--prompts 32 --batch 16]

Both paths run the same `tunepipe.evaluation.generate` (greedy, the same stop tokens and
max_new_tokens); the runs alternate A/B and the median of --repeats is reported. Target (issue 5):
batched >= 3x faster. The outputs of both paths are compared too: batching must not change them.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe.data.chat import prompt_text
    from tunepipe.evaluation import generate
    from tunepipe.quickstart.model import resolve_model_path
    from tunepipe.quickstart.skills import generate as skills

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = skills(seed=5, n_sft_train=1, n_sft_eval=args.prompts, n_dpo_train=1, n_dpo_eval=1)["sft_eval"]
    prompts = [prompt_text(tok, r["messages"]) for r in rows][: args.prompts]

    def timed(batch: int) -> tuple[float, list[str]]:
        t0 = time.perf_counter()
        out = generate(model, tok, prompts, args.max_new_tokens, batch)
        return time.perf_counter() - t0, out

    timed(args.batch)  # warm-up: first calls pay for kernel selection and allocation
    single, batched = [], []
    same = True
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both paths alike
        t1, out1 = timed(1)
        tb, outb = timed(args.batch)
        single.append(t1)
        batched.append(tb)
        same = same and out1 == outb
    s, b = statistics.median(single), statistics.median(batched)
    n = len(prompts)
    threads = torch.get_num_threads()
    print(f"model {args.model}, {n} prompts, max_new_tokens {args.max_new_tokens}, torch threads {threads}")
    for label, runs, median in (("one at a time", single, s), (f"batch {args.batch}", batched, b)):
        listed = ", ".join(f"{x:.2f}" for x in runs)
        print(f"  {label:14s}: {median:7.2f} s  ({n / median:6.2f} prompts/s)   runs: {listed}")
    print(f"  speed-up      : {s / b:.2f}x  (target >= 3x)")
    print(f"  same outputs  : {'yes' if same else 'NO (batching changed a greedy output)'}")


if __name__ == "__main__":
    main()
