"""What the training benchmark's scripts share: the mixed-length chat data, the batch meter that counts what
a trainer is actually fed, and the median / ratio / pass logic of the side-by-side table.

Nothing here imports torch or transformers at module level: the pure parts are tested without them
(tests/test_bench_harness.py), and the scripts import this file as `_common` (bench/ is on sys.path when
they run as `python bench/NAME.py`).
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

IGNORE_INDEX = -100
RESULT_PREFIX = "BENCH_RESULT "  # the one line of a contender's stdout the harness reads

Message = dict[str, str]
Counter = Callable[[list[Message]], int]

# --------------------------------------------------------------------------- data

_ADJ = ("quiet", "bright", "heavy", "narrow", "ancient", "curious", "gentle", "rapid", "hollow", "silver")
_NOUN = (
    *("river", "lantern", "farmer", "engine", "garden", "tower", "letter", "kitten", "bridge"),
    *("harbor", "teacher", "window", "comet", "orchard", "market", "violin", "glacier", "ladder"),
)
_VERB = ("follows", "crosses", "watches", "repairs", "paints", "carries", "finds", "greets", "measures")
_PLACE = ("the old mill", "a busy station", "the northern hills", "a small island", "the city square")


def sentence(rng: random.Random) -> str:
    """One short declarative sentence (~10 tokens) from a combinatorial grammar: never the same twice in
    practice, so held-out conversations are new text with a familiar structure."""
    a, b = rng.sample(_NOUN, 2)
    adj, verb, adj2, place = rng.choice(_ADJ), rng.choice(_VERB), rng.choice(_ADJ), rng.choice(_PLACE)
    return f"The {adj} {a} {verb} the {adj2} {b} near {place}."


# Deterministic rewrites of a paragraph: the reply is learnable from the prompt, so held-out loss falls
# with training, and its length grows with the prompt's.
_TASKS: dict[str, tuple[str, Callable[[list[str]], str]]] = {
    "number": (
        "Number these sentences, one per line.",
        lambda s: "\n".join(f"{i}. {x}" for i, x in enumerate(s, 1)),
    ),
    "reverse": ("Write these sentences in reverse order.", lambda s: " ".join(reversed(s))),
    "bullets": ("Turn these sentences into a bulleted list.", lambda s: "\n".join(f"- {x}" for x in s)),
}


def _corrupt(sentences: list[str], rng: random.Random) -> list[str]:
    """A plausible wrong answer for a preference pair: one sentence dropped, or two swapped."""
    out = list(sentences)
    if len(out) > 2 and rng.random() < 0.5:
        del out[rng.randrange(len(out))]
    elif len(out) >= 2:
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    else:
        out = [sentence(rng)]
    return out


def approx_tokens(messages: list[Message]) -> int:
    """A tokenizer-free stand-in for the chat template's token count (about 1.3 tokens a word, ~5 tokens of
    turn markers per message); the harness passes the real tokenizer's count instead."""
    return sum(5 + round(1.3 * len(m["content"].split())) for m in messages)


def _paragraph_task(
    rng: random.Random, target: int, hi: int, count: Counter
) -> tuple[str, list[str], list[Message]]:
    """Grow a paragraph sentence by sentence until the conversation reaches `target` tokens (never above
    `hi`); returns the task name, the sentences and the conversation."""
    name = rng.choice(list(_TASKS))
    instruction, answer = _TASKS[name]
    sentences = [sentence(rng)]

    def convo(s: list[str]) -> list[Message]:
        return [
            {"role": "user", "content": f"{instruction}\n\n{' '.join(s)}"},
            {"role": "assistant", "content": answer(s)},
        ]

    while True:
        longer = [*sentences, sentence(rng)]
        if count(convo(sentences)) >= target or count(convo(longer)) > hi:
            return name, sentences, convo(sentences)
        sentences = longer


def chat_rows(
    n: int, seed: int, lo: int = 20, hi: int = 400, count: Counter = approx_tokens, short_share: float = 0.5
) -> list[dict[str, Any]]:
    """`n` conversations ({"messages": [...]}) of mixed length within [lo, hi] tokens by `count`: a
    `short_share` of them are the quickstart's one-line skills (~30-60 tokens), the rest paragraph
    rewrites with a length drawn uniformly from [lo, hi], so a random batch mixes short and long rows."""
    from tunepipe.quickstart.skills import generate

    rng = random.Random(seed)
    n_short = round(n * short_share)
    short = [
        {"messages": r["messages"]}
        for r in generate(seed=seed, n_sft_train=n_short, n_sft_eval=0, n_dpo_eval=0, n_dpo_train=0)[
            "sft_train"
        ]
    ]
    rows = [r for r in short if lo <= count(r["messages"]) <= hi]
    while len(rows) < n:
        _, _, messages = _paragraph_task(rng, rng.randint(lo, hi), hi, count)
        if count(messages) >= lo:
            rows.append({"messages": messages})
    rng.shuffle(rows)
    return rows[:n]


def preference_rows(
    n: int, seed: int, lo: int = 20, hi: int = 400, count: Counter = approx_tokens, short_share: float = 0.5
) -> list[dict[str, Any]]:
    """`n` preference pairs ({"prompt", "chosen", "rejected"} as message lists, TRL's conversational
    preference format, which tunepipe reads as `preference`): short skills pairs and paragraph rewrites
    whose wrong answer drops or swaps sentences; prompt + the longer reply stays within [lo, hi]."""
    from tunepipe.quickstart.skills import generate

    rng = random.Random(seed + 1_000)
    n_short = round(n * short_share)
    rows = [
        {k: r[k] for k in ("prompt", "chosen", "rejected")}
        for r in generate(seed=seed, n_sft_train=0, n_sft_eval=0, n_dpo_eval=0, n_dpo_train=n_short)[
            "dpo_train"
        ]
    ]
    while len(rows) < n:
        name, sentences, messages = _paragraph_task(rng, rng.randint(lo, hi), hi, count)
        if count(messages) < lo:
            continue
        wrong = _TASKS[name][1](_corrupt(sentences, rng))
        rows.append(
            {
                "prompt": messages[:1],
                "chosen": messages[1:],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    rng.shuffle(rows)
    return rows[:n]


def pair_length(row: Mapping[str, Any], count: Counter) -> int:
    return max(count(row["prompt"] + row["chosen"]), count(row["prompt"] + row["rejected"]))


def write_jsonl(path: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- the batch meter


@dataclass
class BatchCounts:
    """What one micro-batch fed to the model holds. `loss_tokens` are the positions that carry loss after
    the next-token shift (labels[:, 1:] != -100; for preference batches completion_mask[:, 1:])."""

    samples: int = 0  # conversations (SFT) or preference pairs (DPO)
    tokens: int = 0  # every position fed, padding included
    real_tokens: int = 0  # positions that are not padding
    loss_tokens: int = 0
    batches: int = 0

    def add(self, other: BatchCounts) -> None:
        for k in ("samples", "tokens", "real_tokens", "loss_tokens", "batches"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def padding_share(self) -> float:
        return 1 - self.real_tokens / self.tokens if self.tokens else 0.0


def count_batch(batch: Mapping[str, Any]) -> BatchCounts:
    """Count a collated batch of torch tensors. Handles the layouts TRL's collators produce: padded rows
    with an attention_mask; padding-free rows (one flattened row, position_ids restarting at 0 per
    sequence, no padding; with or without a 4-D block-causal attention_mask); and preference batches
    (chosen rows then rejected rows, completion_mask)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    pos = batch.get("position_ids")
    if mask is not None and mask.dim() > 2:
        mask = None  # the 4-D block-causal mask of a padding-free batch (tunepipe's BlockCausalMask)
    if mask is not None:
        real = int(mask.sum())
        seqs = int(ids.shape[0])
    elif pos is not None:  # padding-free: sequences start where position_ids restart at 0
        real = int(ids.numel())
        seqs = int((pos == 0).sum())
    else:
        real, seqs = int(ids.numel()), int(ids.shape[0])
    if "completion_mask" in batch:
        cm = batch["completion_mask"]
        if mask is not None:
            cm = cm * mask
        loss = int(cm[:, 1:].sum())
        samples = seqs // 2  # chosen and rejected of each pair
    elif "labels" in batch:
        loss = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        samples = seqs
    else:  # no labels: the model's own shift trains every real position but the first of each sequence
        loss, samples = real - seqs, seqs
    return BatchCounts(
        samples=samples, tokens=int(ids.numel()), real_tokens=real, loss_tokens=loss, batches=1
    )


@dataclass
class TrainMeter:
    """Installed once in a contender's process, before any trainer exists: it wraps
    `transformers.Trainer.training_step` (every micro-batch, after the collator, counted once even under
    gradient accumulation), `Trainer.train` (seconds inside train(), summed over OOM retries) and the
    trainers' `__init__` (seconds constructing them). Rates are per second of construction + train() ("fit"):
    moving work from train() into the constructor (TRL's precompute_ref_log_probs does that) gains nothing.
    The same class-level hook serves the plain TRL scripts and tunepipe, so both pay the same (negligible)
    cost."""

    counts: BatchCounts = field(default_factory=BatchCounts)
    train_s: float = 0.0
    init_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    _depth: int = 0

    def install(self) -> TrainMeter:
        import trl
        from transformers import Trainer

        step, train = Trainer.training_step, Trainer.train
        meter = self
        # Trainer construction is timed too: work done there (dataset tokenization, TRL's reference
        # log-prob precomputation) is training cost that must not drop out of the measure. The
        # outermost __init__ counts once, however the classes call each other through super().
        for cls in (Trainer, trl.SFTTrainer, trl.DPOTrainer):
            cls.__init__ = self._timed_init(cls.__init__)  # type: ignore[method-assign]

        def training_step(trainer: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            meter.counts.add(count_batch(inputs))
            return step(trainer, model, inputs, *args, **kwargs)

        def timed_train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return train(trainer, *args, **kwargs)
            finally:
                meter.train_s += time.perf_counter() - t

        Trainer.training_step = training_step  # type: ignore[method-assign]
        Trainer.train = timed_train  # type: ignore[method-assign]
        return self

    def _timed_init(self, init: Callable[..., None]) -> Callable[..., None]:
        meter = self

        def timed(trainer: Any, *args: Any, **kwargs: Any) -> None:
            t = time.perf_counter()
            meter._depth += 1
            try:
                init(trainer, *args, **kwargs)
            finally:
                meter._depth -= 1
                if meter._depth == 0:
                    meter.init_s += time.perf_counter() - t

        return timed

    def result(self, final_loss: float | None, **extra: Any) -> dict[str, Any]:
        c = self.counts
        fit_s = (self.init_s + self.train_s) or float("nan")
        train_s = self.train_s or float("nan")
        return {
            "examples": c.samples,
            "batches": c.batches,
            "wall_s_inproc": round(time.perf_counter() - self.started, 2),
            "init_s": round(self.init_s, 2),
            "train_s": round(self.train_s, 2),
            "fit_s": round(self.init_s + self.train_s, 2),
            # The headline: per second of trainer construction + train(), see TrainMeter.
            "samples_per_s": round(c.samples / fit_s, 3),
            "samples_per_train_s": round(c.samples / train_s, 3),
            "loss_tokens": c.loss_tokens,
            "loss_tokens_per_s": round(c.loss_tokens / fit_s, 1),
            "tokens_fed": c.tokens,
            "padding_share": round(c.padding_share, 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "final_loss": final_loss,
            **extra,
        }


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: Mapping[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise ValueError("no result line in the contender's output")


def last_loss(log_history: Sequence[Mapping[str, Any]]) -> float | None:
    losses = [r["loss"] for r in log_history if "loss" in r]
    return float(losses[-1]) if losses else None


# --------------------------------------------------------------------------- the table


def median(values: Sequence[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return statistics.median(xs) if xs else None


def pair_ratios(ours: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """Per-pair ratios of interleaved runs (run i of one contender with run i of the other): the pairs
    ran back to back, so drift in machine load cancels within a pair."""
    return [a / b for a, b in zip(ours, theirs, strict=True) if b > 0]


@dataclass(frozen=True)
class Verdict:
    ratio: float | None
    target: float
    passed: bool
    ratios: list[float]

    def line(self, what: str) -> str:
        listed = ", ".join(f"{r:.2f}" for r in self.ratios)
        if self.ratio is None:
            return f"{what}: no complete pair of runs: FAIL"
        return (
            f"{what}: {self.ratio:.2f}x (median of per-pair ratios [{listed}]), "
            f"target >= {self.target:.2f}x: " + ("PASS" if self.passed else "FAIL")
        )


def verdict(ours: Sequence[float], theirs: Sequence[float], target: float) -> Verdict:
    ratios = pair_ratios(ours, theirs)
    r = median(ratios)
    return Verdict(r, target, r is not None and r >= target, ratios)


def not_worse(
    ours: float | None, theirs: float | None, higher_is_better: bool, tolerance: float = 0.0
) -> bool:
    """The quality check: tunepipe's eval metric is at least the baseline's (within `tolerance`, absolute)."""
    if ours is None or theirs is None:
        return False
    return ours >= theirs - tolerance if higher_is_better else ours <= theirs + tolerance


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.1f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def table(rows: Sequence[tuple[str, Sequence[Any]]], header: Sequence[str]) -> str:
    cells = [list(header), *([name, *(fmt(v) for v in vals)] for name, vals in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def as_dict(x: Any) -> dict[str, Any]:
    return asdict(x)
