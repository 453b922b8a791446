"""Tiny randomly initialised chat models for tests, built entirely offline.

The tokenizer is a byte-level BPE trained in a second on the quickstart skills text, with ChatML
special tokens and template (the Qwen family's template shape). The models are Qwen3 or Llama
architectures with a few hundred thousand parameters, saved as ordinary model folders.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from tunepipe.quickstart.skills import generate

    splits = generate(seed=123, n_sft_train=200, n_sft_eval=6, n_dpo_train=6, n_dpo_eval=6)
    texts = [m["content"] for r in splits["sft_train"] for m in r["messages"]]
    return texts + ["system user assistant tool", "hello world, the quick brown fox."]


def build_tokenizer(dest: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML
    fast.save_pretrained(dest)


def build_model(dest: Path, arch: str = "qwen3", seed: int = 0, initializer_range: float = 0.02) -> Path:
    """Write a tiny `arch` ('qwen3' or 'llama') model and its tokenizer to `dest`; returns `dest`.
    A wider `initializer_range` (0.5) gives next-token distributions that are not flat: sampled
    completions differ, so RL rewards have something to tell apart."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    build_tokenizer(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(arch)
    model.save_pretrained(dest)
    (dest / "tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return dest
