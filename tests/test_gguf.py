"""GGUF export, checked against real readers: the file loads back through transformers' GGUF
loader (the one that imports the embedded model) and answers like the Hugging Face model.

What "identical" means here: transformers dequantizes a GGUF to fp32, and an f16/bf16 file holds
the 2-D weights rounded to f16/bf16 (1-D norms stay f32, as llama.cpp writes them). So the
reference is the HF model with exactly those weights rounded the same way (round to nearest even,
which numpy, torch and the gguf package all use), run in fp32: every weight is then bit-identical,
so the logits are equal with torch.equal and greedy outputs match token for token. A q8_0 file is
lossy; its logits are compared with the unrounded fp32 model within the Q8_0 tolerances, and exactly
with the model whose weights went through gguf's own Q8_0 round trip (which checks the tensor
names, the Llama Q/K permutation and the layout independently of the quantization error).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tunepipe, write_config

from tunepipe.gguf_export import GGUFExportError, export_gguf, gguf_file_name, write_gguf

# Q8_0 stores each block of 32 weights as int8 times one f16 scale: a weight moves by at most
# 1/254 of its block's largest magnitude. Measured against the fp32 logits, in units of their
# standard deviation: tiny models RMS 0.008, max 0.04; SmolLM2-135M (30 layers) RMS 0.035, max
# 0.18, and the argmax agrees at 97.5% of positions (the rest are near-ties). The bounds:
Q8_0_RMS, Q8_0_MAX, Q8_0_ARGMAX = 0.06, 0.3, 0.9

PROMPTS = ["What is 12 + 30?", "Sort in ascending order: 9, 2, 5", "Write 'red fox' in capital letters."]


def _round_like_the_file(model, quant: str):
    """`model` with its 2-D weights rounded the way `quant` stores them (in place; returns it)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim < 2:
                continue
            if quant == "f16":
                p.copy_(p.half().float())
            elif quant == "bf16":
                p.copy_(p.bfloat16().float())
            else:
                q = quants.quantize(p.numpy().astype(np.float32), GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(quants.dequantize(q, GGMLQuantizationType.Q8_0)))
    return model


def _load_gguf(file: Path):
    """Model and tokenizer through transformers' GGUF loader."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fields = GGUFReader(file).fields
    arch = fields["general.architecture"].contents()
    extra = {}
    if arch == "qwen3":
        # transformers' GGUF config map reads no head size for qwen3 and falls back to
        # Qwen3Config's 128 (right for every released Qwen3); our tiny model has 8. The file
        # carries it as qwen3.attention.key_length, where llama.cpp reads it.
        extra["head_dim"] = fields["qwen3.attention.key_length"].contents()
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, **extra).eval()
    tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    return model, tok


def _prompt_ids(tok, question: str):
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _greedy(model, tok, n: int = 10) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for q in PROMPTS:
            ids = _prompt_ids(tok, q)
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
            )
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


def _logits(model, tok):
    import torch

    with torch.no_grad():
        return torch.cat([model(_prompt_ids(tok, q)).logits[0] for q in PROMPTS])


def _check_roundtrip(hf_dir: Path, out: Path, quant: str, new_tokens: int = 10) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = export_gguf(hf_dir, out, quant, log=lambda _m: None)
    assert file == out / gguf_file_name(quant) and (out / "Modelfile").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary file left behind"
    loaded, loaded_tok = _load_gguf(file)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    if quant == "q8_0":
        exact = _round_like_the_file(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), quant)
        assert torch.equal(_logits(loaded, loaded_tok), _logits(exact, tok))
        want, got = _logits(ref, tok), _logits(loaded, loaded_tok)
        err, std = got - want, want.std().item()
        assert err.pow(2).mean().sqrt().item() <= Q8_0_RMS * std and err.abs().max().item() <= Q8_0_MAX * std
        assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= Q8_0_ARGMAX
    else:
        _round_like_the_file(ref, quant)
        assert torch.equal(_logits(loaded, loaded_tok), _logits(ref, tok))
        assert _greedy(loaded, loaded_tok, new_tokens) == _greedy(ref, tok, new_tokens)


@pytest.fixture(scope="module")
def tiny_qwen2(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 (q/k/v biases) with the Qwen2 tokenizer class (Qwen's split regex), built from
    the tiny vocabulary and merges."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    dest = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    bpe = json.loads((tiny_qwen3 / "tokenizer.json").read_text())["model"]
    tok = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) for m in bpe["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = (tiny_qwen3 / "chat_template.jinja").read_text()
    tok.save_pretrained(dest)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,  # the untied path: output.weight is written
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # biases start at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(dest)
    return dest


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_gguf_loads_back_with_the_same_outputs(
    arch: str, quant: str, tiny_qwen3: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    _check_roundtrip(tiny_qwen3 if arch == "qwen3" else tiny_llama, tmp_path / "gguf", quant)


def test_qwen2_with_biases_untied_head_and_qwen_split(tiny_qwen2: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    _check_roundtrip(tiny_qwen2, tmp_path / "gguf", "f16")
    reader = GGUFReader(tmp_path / "gguf" / "model-f16.gguf")
    names = {t.name for t in reader.tensors}
    assert {"output.weight", "blk.0.attn_q.bias", "blk.1.attn_v.bias"} <= names
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    back = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model-f16.gguf")
    for text in ["it costs 12345 dollars", "<|im_start|>user\nhi<|im_end|>", "don't  stop\n\n"]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tokenizer_and_metadata_round_trip(
    arch: str, tiny_qwen3: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoTokenizer

    hf_dir = tiny_qwen3 if arch == "qwen3" else tiny_llama
    file = write_gguf(hf_dir, tmp_path / "m.gguf", "q8_0", name="tiny", log=lambda _m: None)
    reader = GGUFReader(file)
    f = {k: v.contents() for k, v in reader.fields.items() if k not in ("tokenizer.ggml.merges",)}
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert f["general.architecture"] == arch and f["general.name"] == "tiny"
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert "tokenizer.ggml.bos_token_id" not in f  # the tiny tokenizer has none
    assert f["tokenizer.chat_template"] == tok.chat_template
    assert f["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # the ChatML specials are control tokens
    assert f[f"{arch}.attention.head_count_kv"] == 2 and f[f"{arch}.attention.key_length"] == 8
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types, "tied embeddings: llama.cpp reads the token embedding"
    assert types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32

    back = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    texts = [
        "hello world, the quick brown fox.",
        "<|im_start|>user\n  2+2 =  4?\n\n<|im_end|>",
        "Ünïcödé 123 a\tb",
    ]
    for text in texts:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    conv = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok?"},
    ]
    assert back.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=True
    ) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert (back.eos_token, back.pad_token, back.bos_token) == (tok.eos_token, tok.pad_token, tok.bos_token)


# --------------------------------------------------------------------------- the Modelfile


def _parse_modelfile(text: str) -> dict:
    quoted = {k: v for k, v in re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""', text, re.M | re.S)}
    params = re.findall(r"^PARAMETER (\w+) (.+)$", text, re.M)
    return {
        "from": re.search(r"^FROM (.+)$", text, re.M).group(1),
        **quoted,
        "stop": [json.loads(v) for k, v in params if k == "stop"],
        "params": {k: v for k, v in params if k != "stop"},
    }


def _render_go(template: str, messages: list[dict[str, str]]) -> str:
    """The Go text/template subset the Modelfile uses: {{ range .Messages }}...{{ end }},
    {{ .Role }}, {{ .Content }}, with the {{- and -}} whitespace trims."""
    parts = re.split(r"({{-?\s*.*?\s*-?}})", template)
    for i, part in enumerate(parts):  # apply the trim markers to the neighbouring text
        if part.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip()
        if part.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()

    def run(items: list[str], scope: dict[str, str] | None) -> str:
        out, i = [], 0
        while i < len(items):
            item = items[i]
            action = item.strip("{}- ") if item.startswith("{{") else None
            if action is None:
                out.append(item)
            elif action == "range .Messages":
                depth, j = 1, i + 1
                while depth:
                    a = items[j].strip("{}- ") if items[j].startswith("{{") else None
                    depth += a == "range .Messages" or (a or "").startswith("if ")
                    depth -= a == "end"
                    j += 1
                out += [run(items[i + 1 : j - 1], m) for m in messages]
                i = j
                continue
            elif action in (".Role", ".Content"):
                assert scope is not None, action
                out.append(scope[action[1:].lower()])
            else:
                raise AssertionError(f"the test renderer does not know {item!r}")
            i += 1
        return "".join(out)

    return run(parts, None)


def _ollama_prompt(modelfile: dict, conversation: list[dict[str, str]]) -> str:
    """What Ollama renders: the Modelfile's SYSTEM goes first when the conversation has none."""
    if "SYSTEM" in modelfile and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": modelfile["SYSTEM"]}, *conversation]
    return _render_go(modelfile["TEMPLATE"], conversation)


TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]


def _check_modelfile(hf_dir: Path, out: Path, tok) -> dict:
    export_gguf(hf_dir, out, "q8_0", log=lambda _m: None)
    mf = _parse_modelfile((out / "Modelfile").read_text())
    assert mf["from"] == "./model-q8_0.gguf" and (out / mf["from"]).is_file()
    for conv in (TWO_TURNS, [{"role": "system", "content": "Be brief."}, *TWO_TURNS]):
        expected = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert _ollama_prompt(mf, conv) == expected
    assert tok.eos_token in mf["stop"]
    return mf


def test_modelfile_template_renders_what_the_chat_template_renders(tiny_qwen3: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    mf = _check_modelfile(tiny_qwen3, tmp_path / "gguf", AutoTokenizer.from_pretrained(tiny_qwen3))
    assert "SYSTEM" not in mf and mf["stop"] == ["<|im_end|>", "<|im_start|>"]
    assert mf["params"]["temperature"] == "0" and mf["params"]["num_ctx"] == "256"


def test_modelfile_keeps_the_templates_default_system_message(tiny_qwen3: Path, tmp_path: Path) -> None:
    """SmolLM2 and Qwen2.5 templates add a system message when there is none: that becomes SYSTEM."""
    from transformers import AutoTokenizer

    hf_dir = tmp_path / "model"
    shutil.copytree(tiny_qwen3, hf_dir)
    (hf_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a tiny helper.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    mf = _check_modelfile(hf_dir, tmp_path / "gguf", AutoTokenizer.from_pretrained(hf_dir))
    assert mf["SYSTEM"] == "You are a tiny helper."


def test_a_template_it_cannot_translate_is_left_to_ollama(tiny_qwen3: Path, tmp_path: Path) -> None:
    hf_dir = tmp_path / "model"
    shutil.copytree(tiny_qwen3, hf_dir)
    (hf_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    )
    logs: list[str] = []
    export_gguf(hf_dir, tmp_path / "gguf", "f16", log=logs.append)
    text = (tmp_path / "gguf" / "Modelfile").read_text()
    assert "TEMPLATE" not in _parse_modelfile(text) and "no TEMPLATE" in text
    assert any("not ChatML or Llama 3" in m for m in logs)


# --------------------------------------------------------------------------- errors


def test_an_unsupported_architecture_names_the_supported_ones(tiny_qwen3: Path, tmp_path: Path) -> None:
    hf_dir = tmp_path / "model"
    shutil.copytree(tiny_qwen3, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(GGUFExportError, match=r"'gpt2'.*llama, qwen2, qwen3"):
        write_gguf(hf_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))


def test_cli_rejects_bad_options_and_architectures_with_exit_2(tmp_path: Path) -> None:
    from transformers import GPT2Config

    model = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(model)
    cfg = write_config(tmp_path, model)
    cases = [
        (["--format", "gguf"], "architecture 'gpt2'; it supports llama, qwen2, qwen3"),
        (["--format", "gguf", "--quant", "q4_k"], "--quant 'q4_k' is not one of f16, bf16, q8_0"),
        (["--quant", "q8_0"], "--quant applies to --format gguf only"),
        # A stage that has not finished: named with the command that trains it, nothing loaded.
        ([], f"stage dpo has not run in {tmp_path / 'runs' / 'test'}: run `tunepipe run {cfg}`"),
        (["--stage", "sft"], f"(or `tunepipe train {cfg} --stage sft`) first"),
    ]
    for args, message in cases:
        r = tunepipe("export", cfg, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("export-*"))


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_exports_a_trained_stage_as_gguf(tmp_path: Path, tiny_llama: Path) -> None:
    """data + SFT on the tiny Llama, then `tunepipe export --format gguf`: the GGUF answers like
    the merged adapter model (f16-rounded weights, so exactly)."""
    import torch

    from tunepipe.config import load_config
    from tunepipe.modeling import load_stage_model, load_tokenizer, plan_for

    cfg = write_config(tmp_path, tiny_llama)
    raw = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**raw, "pipeline": ["sft"]}, sort_keys=False))
    for args in (["data", cfg, "--smoke"], ["train", cfg, "--stage", "sft", "--smoke"]):
        r = tunepipe(*args)
        assert r.returncode == 0, r.stdout + r.stderr
    r = tunepipe("export", cfg, "--smoke", "--format", "gguf")
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "runs" / "test-smoke" / "export-sft-gguf"
    names = ["Modelfile", "README.md", "model-f16.gguf", "tunepipe-export.json"]
    assert sorted(p.name for p in out.iterdir()) == names  # README.md: the model card
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "gguf" and "gguf" in (card.data.tags or [])
    assert json.loads((out / "tunepipe-export.json").read_text())["quant"] == "f16"
    assert not list(out.parent.glob(".export-*")), "temporary folders removed"

    c = load_config(cfg)
    merged = load_stage_model(c, plan_for(c.model), out.parent, "sft", log=lambda _m: None).eval()
    merged = _round_like_the_file(merged, "f16")
    tok = load_tokenizer(c, log=lambda _m: None)
    loaded, loaded_tok = _load_gguf(out / "model-f16.gguf")
    assert torch.equal(_logits(loaded, loaded_tok), _logits(merged, tok))
    assert _greedy(loaded, loaded_tok) == _greedy(merged, tok)


@pytest.mark.slow
def test_the_embedded_model_round_trips(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (Llama architecture, 49k vocabulary, a default system message)."""
    from transformers import AutoTokenizer

    from tunepipe.quickstart import model as embedded

    hf_dir = Path(embedded.resolve_model_path("smollm2-135m-instruct", log=lambda _m: None))
    for quant in ("f16", "q8_0"):
        _check_roundtrip(hf_dir, tmp_path / quant, quant, new_tokens=6)
    mf = _check_modelfile(hf_dir, tmp_path / "mf", AutoTokenizer.from_pretrained(hf_dir))
    assert mf["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")
