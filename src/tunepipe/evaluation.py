"""Metrics on held-out data: exact match by greedy generation, assistant-token loss, preference accuracy.

All three are computed batched; generation uses left padding so every prompt ends where the new
tokens begin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .data.chat import IGNORE_INDEX, prompt_text, tokenize_conversation
from .data.formats import Conversation


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def normalise(text: str) -> str:
    return " ".join(text.strip().split())


def generate(
    model: Any,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions for chat-formatted prompts, in the input order."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    out: list[str] = [""] * len(prompts)
    old_side = tok.padding_side
    tok.padding_side = "left"
    eos = model.generation_config.eos_token_id or tok.eos_token_id
    try:
        for idx in _batches(order, batch_size):
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=eos,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            for i, seq in zip(idx, new, strict=True):
                out[i] = tok.decode(seq, skip_special_tokens=True)
            if progress:
                progress(len(idx))
    finally:
        tok.padding_side = old_side
    return out


def _label_logprobs(model: Any, ids: Any, mask: Any, target: Any, keep: Any) -> Any:
    """log p of each kept target token, shape [N]. Projects only the kept positions through the LM head:
    full logits would be batch x length x vocab floats (49k-152k vocab), most of them never read."""
    import torch

    config = getattr(model, "config", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    softcap = getattr(config, "final_logit_softcapping", None)
    if decoder is not None and head is not None and decoder is not model and not softcap:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        logits = head(hidden[keep]).float()
    else:  # architectures without a separable head: the plain forward
        logits = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1][keep]
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(
    model: Any,
    seqs: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """(sum of log p over labelled tokens, number of labelled tokens) per (input_ids, labels) pair."""
    import torch

    # Similar lengths batched together pad less; results go back in the input order.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    for idx in _batches(order, batch_size):
        batch = [seqs[i] for i in idx]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (i, lab) in enumerate(batch):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        device = model.device
        # Token t is predicted from position t-1.
        target = labels[:, 1:].to(device)
        keep = target != IGNORE_INDEX
        with torch.no_grad():
            picked = _label_logprobs(model, ids.to(device), mask.to(device), target, keep)
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(len(batch), dtype=picked.dtype, device=picked.device).index_add_(0, rows, picked)
        counts = keep.sum(dim=1)
        for r, i in enumerate(idx):
            results[i] = (sums[r].item(), int(counts[r].item()))
        if progress:
            progress(len(batch))
    return results


def assistant_loss(
    model: Any,
    rows: list[dict[str, Any]],
    pad_id: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> float:
    """Mean cross-entropy per assistant token (the tokens SFT trains on)."""
    seqs = [(r["input_ids"], r["labels"]) for r in rows]
    lp = sequence_logprobs(model, seqs, pad_id, batch_size, progress)
    total, n = sum(x for x, _ in lp), sum(k for _, k in lp)
    return -total / max(n, 1)


def preference_accuracy(
    model: Any,
    tok: Any,
    pairs: list[dict[str, Conversation]],
    batch_size: int,
    enable_thinking: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, list[float]]:
    """Share of pairs where log p(chosen | prompt) > log p(rejected | prompt), and the margins."""
    seqs = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            seqs.append(
                tokenize_conversation(
                    tok, p["prompt"] + p[side], train_on="last", enable_thinking=enable_thinking
                )
            )
    lp = sequence_logprobs(model, seqs, tok.pad_token_id, batch_size, progress)
    margins = [lp[2 * i][0] - lp[2 * i + 1][0] for i in range(len(pairs))]
    return sum(m > 0 for m in margins) / max(len(margins), 1), margins


def exact_match(
    model: Any,
    tok: Any,
    rows: list[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int,
    enable_thinking: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Share of conversations whose greedy reply equals the reference final assistant turn."""
    prompts = [prompt_text(tok, r["messages"], enable_thinking) for r in rows]
    refs = [next(m["content"] for m in reversed(r["messages"]) if m["role"] == "assistant") for r in rows]
    preds = generate(model, tok, prompts, max_new_tokens, batch_size, progress)
    samples = [
        {
            "prompt": r["messages"][-2]["content"] if len(r["messages"]) > 1 else "",
            "reference": ref,
            "prediction": pred,
            "correct": normalise(pred) == normalise(ref),
        }
        for r, ref, pred in zip(rows, refs, preds, strict=True)
    ]
    return sum(s["correct"] for s in samples) / max(len(samples), 1), samples
