"""Each speed switch keeps the loss of the same batch within a stated tolerance of the plain path, and
does the work it claims: padding-free / packed batches with the block mask (1e-4) and length grouping
(less padding), the LM head on loss positions only (log-probs, entropy and gradients within 1e-4, fewer
rows projected), gradient checkpointing (loss and gradients within 1e-4), bf16 autocast (loss within 1%
of fp32), and the DPO reference from the disabled adapter or precomputed (loss within 1e-4 of a frozen
copy). Real TRL collators, trainers and the fused LM head on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunepipe.collators import BlockCausalMask, block_causal_mask

TOL = 1e-4  # fp32 on CPU: the same sums in another order


def _examples(n: int = 5, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + (9 * i) % 115  # 6 .. 120 tokens: very mixed lengths
        ids = torch.randint(10, 300, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]  # loss on the second half, like a reply
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen3, attn_implementation="sdpa").eval()


def test_block_causal_mask_shape_and_boundaries() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_causal_mask(pos)[0, 0]
    assert m.shape == (6, 6)
    assert m[2].tolist() == [True, True, True, False, False, False]
    assert m[4].tolist() == [False, False, False, True, True, False]
    assert m[5].tolist() == [False] * 5 + [True]


def test_padding_free_with_block_mask_equals_the_padded_loss(model) -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ex = _examples()
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(ex)
    flat_plain = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    flat = BlockCausalMask(flat_plain)(ex)
    assert flat["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in ex))  # no padding at all
    assert "cu_seq_lens_q" not in flat and flat["attention_mask"].shape[-1] == flat["input_ids"].shape[1]
    with torch.no_grad():
        reference = model(**padded).loss.item()
        masked = model(**flat).loss.item()
        # What sdpa does with position ids alone: the last row attends to the rows before it.
        last = torch.tensor([ex[-1]["input_ids"]])
        alone = model(input_ids=last).logits[0]
        plain = flat_plain(ex)
        contaminated = model(input_ids=plain["input_ids"], position_ids=plain["position_ids"]).logits[0]
        isolated = model(
            input_ids=flat["input_ids"],
            position_ids=flat["position_ids"],
            attention_mask=flat["attention_mask"],
        ).logits[0]
    n = last.shape[1]
    assert masked == pytest.approx(reference, abs=TOL)
    assert torch.allclose(isolated[-n:], alone, atol=TOL)
    assert (contaminated[-n:] - alone).abs().max() > 1e-3


def test_packing_with_block_mask_equals_the_per_sequence_loss(model) -> None:
    """BFD packing (TRL's pack_dataset) puts several rows in one sequence; with the mask the summed loss
    is the sum of each row's own loss."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ex = _examples()
    packed = pack_dataset(Dataset.from_list(ex), seq_length=64, strategy="bfd")
    rows = packed.to_list()
    assert len(rows) < len(ex)  # rows were actually packed together
    batch = BlockCausalMask(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))(rows)

    def summed(out_loss: float, labels: torch.Tensor) -> float:
        return out_loss * int((labels[:, 1:] != -100).sum())

    with torch.no_grad():
        packed_sum = summed(model(**batch).loss.item(), batch["labels"])
        each = 0.0
        for e in ex:
            one = DataCollatorForLanguageModeling(pad_token_id=0)([e])
            each += summed(model(**one).loss.item(), one["labels"])
    assert packed_sum == pytest.approx(each, rel=TOL)


def _padding_share(trainer) -> float:
    pad = total = 0
    for batch in trainer.get_train_dataloader():
        mask = batch["attention_mask"]
        pad += int((mask == 0).sum())
        total += mask.numel()
    return pad / total


def _trainer(tmp_path: Path, model_dir: Path, group: bool, padding_free: bool = False):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunepipe import compat
    from tunepipe.collators import length_grouped_order

    tok = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,  # the dataloader below covers the whole epoch
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        activation_checkpointing=False,
        padding_free=padding_free,
        max_length=None if padding_free else 128,
        seed=0,
        **compat.sampling_kwargs(SFTConfig, "sequential" if group else "random"),
    )
    rows = _examples(n=256, seed=1)
    if group:  # what the SFT stage does: a seeded length-grouped order, read sequentially
        rows = [rows[i] for i in length_grouped_order([len(r["input_ids"]) for r in rows], 4, seed=0)]
    data = Dataset.from_list(rows)
    from peft import LoraConfig

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa"),
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    return trainer


def test_length_grouping_cuts_padding(tmp_path: Path, tiny_qwen3: Path) -> None:
    grouped = _padding_share(_trainer(tmp_path / "g", tiny_qwen3, group=True))
    shuffled = _padding_share(_trainer(tmp_path / "r", tiny_qwen3, group=False))
    assert grouped < 0.5 * shuffled, (grouped, shuffled)


def test_padding_free_trainer_trains_with_the_block_mask(tmp_path: Path, tiny_qwen3: Path) -> None:
    trainer = _trainer(tmp_path, tiny_qwen3, group=False, padding_free=True)
    trainer.data_collator = BlockCausalMask(trainer.data_collator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and batch["attention_mask"].dim() == 4
    before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_length_grouped_order_is_a_seeded_permutation_with_similar_neighbours() -> None:
    import random

    from tunepipe.collators import length_grouped_order

    rng = random.Random(3)
    lengths = [rng.randint(5, 400) for _ in range(1000)]
    order = length_grouped_order(lengths, 8, seed=1)
    assert sorted(order) == list(range(1000)) and order == length_grouped_order(lengths, 8, seed=1)
    assert order != length_grouped_order(lengths, 8, seed=2)

    def padding(o: list[int]) -> int:
        return sum(
            max(lengths[j] for j in o[i : i + 8]) * 8 - sum(lengths[j] for j in o[i : i + 8])
            for i in range(0, len(o), 8)
        )

    shuffled = list(range(1000))
    random.Random(1).shuffle(shuffled)
    assert padding(order) < 0.2 * padding(shuffled)
    assert max(lengths[j] for j in order[:8]) == max(lengths)  # the longest group first


def _head_pass(model_dir: Path, batch: dict, compact: bool) -> tuple[dict, dict, list[int]]:
    """One forward + backward through TRL's fused LM head (as DPOTrainer patches it), with or without
    tunepipe's loss-positions-only switch; returns the per-token outputs, the gradients and the row
    counts the vocabulary projection was given (a spy on TRL's chunked log-prob function)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils
    from trl.trainer.utils import add_fused_lm_head

    from tunepipe.compat import lm_head_on_loss_positions

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    rows: list[int] = []
    real = utils._ChunkedLogProbFunction

    class Spy:  # counts the hidden rows projected through the vocabulary, then does the real work
        @staticmethod
        def apply(hidden, *args):
            rows.append(hidden.shape[0])
            return real.apply(hidden, *args)

    utils._ChunkedLogProbFunction = Spy
    try:
        with lm_head_on_loss_positions(compact) as applied:
            assert applied is compact
            out = model(**batch, fused_lm_head=True)
            out.loss.backward()
    finally:
        utils._ChunkedLogProbFunction = real
    fields = {k: getattr(out, k).detach().float() for k in ("log_probs", "entropy", "mean_logits", "is_top1")}
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return fields, grads, rows


def test_lm_head_on_loss_positions_gives_the_same_loss_and_gradients_for_less_work(tiny_qwen3: Path) -> None:
    from trl.trainer import utils

    batch = _padded_batch(n=4, seed=2)
    ids, labels = batch["input_ids"], batch["labels"]
    width = ids.shape[1]
    before = utils._use_triton

    plain, plain_grads, plain_rows = _head_pass(tiny_qwen3, batch, compact=False)
    compact, compact_grads, compact_rows = _head_pass(tiny_qwen3, batch, compact=True)

    assert utils._use_triton is before  # the switch is undone when the context closes
    loss_positions = int((labels[:, 1:] != -100).sum())
    assert plain_rows == [ids.shape[0] * (width - 1)]  # TRL on CPU: every position, padding included
    assert compact_rows == [loss_positions] and loss_positions < 0.5 * plain_rows[0]
    for k in plain:
        assert torch.allclose(plain[k], compact[k], atol=TOL), k
    assert plain_grads.keys() == compact_grads.keys() and plain_grads
    for k in plain_grads:
        assert torch.allclose(plain_grads[k], compact_grads[k], atol=TOL), k


def test_lm_head_switch_is_undone_when_training_fails() -> None:
    """A stage that fails inside the context (here with an out-of-memory error that nothing catches)
    must not leave TRL's decision function patched for whatever runs next in the process."""
    from trl.trainer import utils

    from tunepipe.compat import lm_head_on_loss_positions

    before = utils._use_triton
    with pytest.raises(torch.OutOfMemoryError), lm_head_on_loss_positions(True) as applied:
        assert applied and utils._use_triton is not before
        assert utils._use_triton(torch.device("cpu")) is True
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert utils._use_triton is before and utils._use_triton(torch.device("cpu")) is False


def test_trainer_is_built_under_the_switch_and_an_oom_while_building_is_retried(
    tmp_path: Path, tiny_qwen3: Path
) -> None:
    """A DPO trainer that precomputes reference log-probs runs the model while it is built: the switch
    is on then, and an out-of-memory error there halves the micro-batch like one in train(). The
    trainer is a stand-in (the real ones run in the pipeline and resume tests); Training is real."""
    from types import SimpleNamespace

    from conftest import write_config
    from trl.trainer import utils

    from tunepipe.config import load_config
    from tunepipe.stages import StageContext
    from tunepipe.training import Training

    cfg = load_config(write_config(tmp_path, tiny_qwen3))
    lines: list[str] = []
    ctx = StageContext(cfg=cfg, run_dir=tmp_path / "run", log=lines.append, fingerprint="f")
    training = Training(ctx, "dpo", ctx.stage_dir("dpo"))
    seen: list[tuple[int, int, bool]] = []

    class Trainer:
        state = SimpleNamespace(global_step=3)

        def compute_loss(self, *args, **kwargs):
            raise AssertionError("not called by the stand-in")

        def train(self, resume_from_checkpoint=None):
            return SimpleNamespace(global_step=3, metrics={})

    def build(batch: int, accum: int) -> Trainer:
        seen.append((batch, accum, utils._use_triton(torch.device("cpu"))))
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return Trainer()

    assert training.run(build, 4, 2).global_step == 3
    assert seen == [(4, 2, True), (2, 4, True)]  # built with the switch on, twice, same effective batch
    assert utils._use_triton(torch.device("cpu")) is False
    assert training.batch_changes == [
        "out of memory while building the trainer (reference log-probs): micro-batch 4 -> 2, "
        "gradient accumulation 2 -> 4 (same effective batch)"
    ]
    assert lines.count("dpo: LM head projects only the loss-bearing positions") == 1


# --------------------------------------------------------------------------- the other switches, same batch

BF16_REL_TOL = 1e-2  # bf16 autocast rounds matmul inputs to 8 mantissa bits: loss within 1% of fp32


def _padded_batch(n: int = 4, seed: int = 3) -> dict:
    ex = _examples(n=n, seed=seed)
    width = max(len(e["input_ids"]) for e in ex)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in ex])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in ex])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e["input_ids"]) for e in ex])[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model_dir: Path, checkpointing: bool = False, autocast: bool = False, calls=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa"),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False),
    )
    model.train()
    if checkpointing:  # what trainer_args asks for: non-reentrant activation checkpointing
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if calls is not None:  # count the first decoder layer's attention calls (checkpointing reruns them)
        # transformers checkpoints the layer's forward (its own hooks stay outside), so hook a submodule;
        # a pre-hook, since torch's non-reentrant recompute stops early, before forward hooks would run.
        attn = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
        attn.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**_padded_batch()).loss
    loss.backward()
    grads = {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.float().item(), grads


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_qwen3: Path) -> None:
    plain_calls: list[int] = []
    ckpt_calls: list[int] = []
    plain, plain_grads = _loss_and_grads(tiny_qwen3, calls=plain_calls)
    ckpt, ckpt_grads = _loss_and_grads(tiny_qwen3, checkpointing=True, calls=ckpt_calls)
    assert len(plain_calls) == 1 and len(ckpt_calls) == 2  # recomputed in backward: checkpointing ran
    assert ckpt == pytest.approx(plain, abs=TOL)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for k in plain_grads:
        assert torch.allclose(plain_grads[k], ckpt_grads[k], atol=TOL), k


def test_bf16_autocast_keeps_the_loss_within_its_tolerance(tiny_qwen3: Path) -> None:
    fp32, _ = _loss_and_grads(tiny_qwen3)
    bf16, grads = _loss_and_grads(tiny_qwen3, autocast=True)
    assert bf16 == pytest.approx(fp32, rel=BF16_REL_TOL)
    assert bf16 != fp32  # autocast really ran in bf16
    assert all(torch.isfinite(g).all() for g in grads.values())


def _dpo_loss(tmp_path: Path, model_dir: Path, reference: str) -> float:
    """DPO loss of one batch (all pairs) with the policy's LoRA set to the same non-zero values, the
    reference held as tunepipe's dpo.reference says: adapter (the policy with the adapter disabled),
    precompute (log-probs computed once at trainer construction) or copy (a frozen second model)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [
        {
            "prompt": f"What is {i} plus {i}?",
            "chosen": f" It is {2 * i}.",
            "rejected": f" Maybe {2 * i + 1}, or not.",
        }
        for i in range(4)
    ]
    args = DPOConfig(
        output_dir=str(tmp_path / reference),
        per_device_train_batch_size=len(rows),
        use_cpu=True,
        bf16=False,
        report_to="none",
        activation_checkpointing=False,
        precompute_ref_log_probs=reference == "precompute",
        max_length=64,
    )
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval() if reference == "copy" else None
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # LoRA B starts at 0 (policy == reference); make the policy differ, identically
        for name, p in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def test_dpo_reference_from_the_disabled_adapter_or_precomputed_equals_a_frozen_copy(
    tmp_path: Path, tiny_qwen3: Path
) -> None:
    copy = _dpo_loss(tmp_path, tiny_qwen3, "copy")
    assert abs(copy - 0.6931) > 0.02  # the policy differs from the reference: not the trivial log 2
    assert _dpo_loss(tmp_path, tiny_qwen3, "adapter") == pytest.approx(copy, abs=TOL)
    assert _dpo_loss(tmp_path, tiny_qwen3, "precompute") == pytest.approx(copy, abs=TOL)
