"""Batch layouts that waste less compute: padding-free batches that keep each sequence to itself
whatever the attention kernel, and a length-grouped order for datasets the trainer cannot group.

TRL's padding-free collator (and its BFD packing) concatenates a micro-batch into one row with
`position_ids` restarting at 0 for each sequence. flash-attn's varlen kernels read the boundaries
from there; sdpa and eager do not: without a mask every token would attend to the sequences packed
before it (cross-contamination, measured: logits off by ~15 on the embedded model). For those
kernels `BlockCausalMask` adds a 4-D boolean mask, causal inside each sequence and closed between
them, and drops the varlen-only keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def block_causal_mask(position_ids: Any) -> Any:
    """[batch, T] position ids restarting at 0 per sequence -> [batch, 1, T, T] bool, True = attend."""
    import torch

    seq = (position_ids == 0).cumsum(dim=-1)  # sequence number of each token
    same = seq[:, :, None] == seq[:, None, :]
    t = position_ids.shape[-1]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=position_ids.device))
    return (same & causal)[:, None]


class BlockCausalMask:
    """Wraps a padding-free collator for attention kernels that need an explicit mask."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.inner(examples)
        for key in VARLEN_KEYS:
            out.pop(key, None)
        out["attention_mask"] = block_causal_mask(out["position_ids"])
        return out


def needs_block_mask(attn_implementation: str) -> bool:
    """flash-attn (2/3, and the kernels hub's varlen kernels) read sequence boundaries from position ids."""
    return "flash" not in attn_implementation


def length_grouped_order(lengths: list[int], group: int, seed: int) -> list[int]:
    """A shuffled order in which every run of `group` consecutive rows has similar lengths.

    Like transformers' LengthGroupedSampler: shuffle, cut into mega-batches of 4-50 groups, sort each
    by length (longest first), then shuffle the groups, so batches pad little yet the data order
    stays random between groups. Deterministic for a seed (resume replays the same order)."""
    import random

    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    # At least 4 groups per mega-batch, or small datasets (a few groups) would not be grouped at all.
    mega = group * min(50, max(4, len(idx) // (group * 4)))
    ordered: list[int] = []
    for i in range(0, len(idx), mega):
        ordered += sorted(idx[i : i + mega], key=lambda j: -lengths[j])
    groups = [ordered[i : i + group] for i in range(0, len(ordered), group)]
    rng.shuffle(groups)
    if groups:  # the group holding the longest row goes first: an OOM shows up at step 1
        longest = max(range(len(lengths)), key=lambda j: lengths[j])
        k = next(n for n, g in enumerate(groups) if longest in g)
        groups[0], groups[k] = groups[k], groups[0]
    return [j for g in groups for j in g]
