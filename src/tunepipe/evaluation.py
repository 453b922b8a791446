"""Model-side evaluation: batched generation, assistant-token log-probabilities (loss, perplexity)
and preference margins. Scoring generated text against references lives in `metrics`.

Everything is batched; sequences are sorted by length so a batch pads little, and results come
back in the input order. Under several processes (`shard`), each process computes its share of the
batches and every process gets all results: the same numbers as one process (see `_map_batches`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .data.chat import IGNORE_INDEX, tokenize_conversation
from .data.formats import Conversation

T = TypeVar("T")

Shard = tuple[int, int]  # (this process's rank, number of processes)
ONE_PROCESS: Shard = (0, 1)


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def shard_batches(n_batches: int, shard: Shard) -> range:
    """The batches one process computes: r, r+N, r+2N, ... Strided rather than contiguous because
    batches are ordered by length: every process gets short and long ones, and finishes about when
    the others do."""
    rank, world = shard
    return range(rank, n_batches, world)


def shard_size(n: int, batch_size: int, shard: Shard) -> int:
    """How many of `n` items this process computes (its share of the batches)."""
    return sum(min(batch_size, n - b * batch_size) for b in shard_batches(-(-n // batch_size), shard))


def _map_batches(
    order: list[int],
    batch_size: int,
    compute: Callable[[int, list[int]], list[T]],
    shard: Shard,
    progress: Callable[[int], None] | None,
) -> list[T]:
    """compute(batch number, indices) for the batches of `order` (a permutation of range(n)) that
    fall to this process; the results of all processes, indexed like the input, in every process.
    `progress` counts this process's items.

    Every process cuts the same batches from the whole `order` and takes its share of them whole, so
    an item meets the same batch mates, padding width and sampling seed as in one process: its result
    does not depend on the number of processes, and neither do the metrics computed from them."""
    batches = list(_batches(order, batch_size))
    done: dict[int, T] = {}
    for b in shard_batches(len(batches), shard):
        idx = batches[b]
        done.update(zip(idx, compute(b, idx), strict=True))
        if progress:
            progress(len(idx))
    if shard[1] > 1:
        from .dist import all_gather_objects

        for part in all_gather_objects(done):
            done.update(part)
    return [done[i] for i in range(len(order))]


# End-of-turn markers of common chat templates; generation stops at these as well as at EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def stop_token_ids(model: Any, tok: Any) -> list[int]:
    """EOS (model and tokenizer), the template's end-of-turn token, and known end-of-turn markers in
    the vocabulary: a base model's EOS is often not what its chat template closes a reply with."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)

    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    add(tok.eos_token_id)
    vocab = tok.get_vocab()
    add([vocab[t] for t in END_OF_TURN if t in vocab])
    # The template's own: the first special token right after an assistant reply.
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "REPLY"}], tokenize=False
            )
            after = text[text.rindex("REPLY") + len("REPLY") :]
            special = set(tok.all_special_ids) | {
                i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)
            }
            first = tok(after, add_special_tokens=False)["input_ids"][:2]
            add([i for i in first if i in special][:1])
        except Exception:  # an unusual template: EOS and the known markers still apply
            pass
    return ids


def generation_config(
    model: Any,
    tok: Any,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Any:
    """Greedy unless `do_sample`, stopping at EOS or the template's end-of-turn token. A config of our
    own: the model's shipped defaults (sampling, repetition penalty) don't leak in."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=stops,
        pad_token_id=pad,
        **({"temperature": temperature, "top_p": top_p} if do_sample else {}),
    )


def generate(
    model: Any,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    shard: Shard = ONE_PROCESS,
) -> list[str]:
    """Completions for chat-formatted prompts, in the input order: batched with left padding, greedy
    unless `do_sample` (seeded per batch from `seed`, so a batch samples the same in any process),
    each stopping at EOS or the template's end-of-turn token."""
    import torch

    gen_cfg = generation_config(model, tok, max_new_tokens, do_sample, temperature, top_p)

    def complete(b: int, idx: list[int]) -> list[str]:
        if do_sample:
            torch.manual_seed(seed + b * 1_000_003)  # batch 0 as before; other batches their own stream
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            gen = model.generate(**enc, generation_config=gen_cfg)
        return [tok.decode(seq, skip_special_tokens=True) for seq in gen[:, enc["input_ids"].shape[1] :]]

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    old_side = tok.padding_side
    tok.padding_side = "left"  # every prompt ends where the new tokens begin
    try:
        return _map_batches(order, batch_size, complete, shard, progress)
    finally:
        tok.padding_side = old_side


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
    *,
    shard: Shard = ONE_PROCESS,
) -> list[tuple[float, int]]:
    """(sum of log p over labelled tokens, number of labelled tokens) per (input_ids, labels) pair."""
    import torch

    def score(_b: int, idx: list[int]) -> list[tuple[float, int]]:
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
        return [(sums[r].item(), int(counts[r].item())) for r in range(len(idx))]

    # Similar lengths batched together pad less; results go back in the input order.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    return _map_batches(order, batch_size, score, shard, progress)


def assistant_loss(
    model: Any,
    rows: list[dict[str, Any]],
    pad_id: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    *,
    shard: Shard = ONE_PROCESS,
) -> float:
    """Mean cross-entropy per assistant token (the tokens SFT trains on)."""
    seqs = [(r["input_ids"], r["labels"]) for r in rows]
    lp = sequence_logprobs(model, seqs, pad_id, batch_size, progress, shard=shard)
    total, n = sum(x for x, _ in lp), sum(k for _, k in lp)
    return -total / max(n, 1)


def preference_margins(
    model: Any,
    tok: Any,
    pairs: list[dict[str, Conversation]],
    batch_size: int,
    enable_thinking: bool | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    shard: Shard = ONE_PROCESS,
) -> list[float]:
    """log p(chosen reply | prompt) - log p(rejected reply | prompt) per pair, summed over the reply's
    tokens: > 0 means the model prefers the chosen reply."""
    seqs = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            seqs.append(
                tokenize_conversation(
                    tok, p["prompt"] + p[side], train_on="last", enable_thinking=enable_thinking
                )
            )
    lp = sequence_logprobs(model, seqs, tok.pad_token_id, batch_size, progress, shard=shard)
    return [lp[2 * i][0] - lp[2 * i + 1][0] for i in range(len(pairs))]


def reference_reply(messages: Conversation) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")


def last_user_text(messages: Conversation) -> str:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
