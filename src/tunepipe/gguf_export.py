"""GGUF export: a merged Hugging Face model folder as one `.gguf` file plus an Ollama `Modelfile`.

Written with the `gguf` package the way llama.cpp's `convert_hf_to_gguf.py` writes these
architectures: llama.cpp tensor names (`blk.N.attn_q.weight`), the Llama Q/K rows permuted for
llama.cpp's rotary layout (transformers' GGUF loader permutes them back), 1-D tensors kept in
f32, the byte-level BPE tokenizer with its merges, special token ids and chat template in the
metadata, and `output.weight` left out when the embeddings are tied. The file is written next to
its final name and renamed, so an interrupted export never looks finished.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUANTS = ("f16", "bf16", "q8_0")
DEFAULT_QUANT = "f16"  # what llama.cpp and Ollama run fast everywhere; a bf16 model defaults to bf16


class GGUFExportError(ValueError):
    """The model or the options cannot be exported to GGUF (exit code 2); the message says why."""


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # general.architecture, and the prefix of the hyperparameter keys
    permute_qk: bool  # llama.cpp's llama graph wants the rotary halves interleaved


# HF model_type -> how llama.cpp names it (SmolLM2 is the llama architecture). Mistral would map
# to llama too, but its releases ship SentencePiece tokenizers, which this writer does not convert.
ARCHITECTURES = {
    "llama": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2", permute_qk=False),
    "qwen3": Arch("qwen3", permute_qk=False),
}

# The split regexes llama.cpp knows by `tokenizer.ggml.pre` name (llama-vocab.cpp). Matched
# against the tokenizer.json pre-tokenizer, so llama.cpp splits text the way the merges were learned.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def supported_architectures() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def check_architecture(model_type: str) -> Arch:
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise GGUFExportError(
            f"GGUF export does not support the model architecture '{model_type}'; it supports "
            f"{supported_architectures()} (Llama 3, SmolLM2, Qwen2/2.5, Qwen3). "
            "Export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py instead"
        )
    return arch


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant '{quant}' is not one of {', '.join(QUANTS)}")
    return quant


def default_quant(model_dir: Path) -> str:
    """bf16 for a model saved in bf16 (f16 would clip its range), else f16."""
    config = json.loads((model_dir / "config.json").read_text())
    return "bf16" if (config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else DEFAULT_QUANT


def gguf_file_name(quant: str) -> str:
    return f"model-{quant}.gguf"


# --------------------------------------------------------------------------------------------
# weights


def _read_state_dict(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, fp32 numpy array) for every tensor of the folder's safetensors files, one at a time."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key).float().numpy()


def permute_qk(weights: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's `LlamaModel.permute`: rotary pairs from HF's half-split layout to interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _encode(data: Any, quant: str) -> tuple[Any, Any]:
    """(array, raw_dtype) in the file's type. 1-D tensors stay f32 (llama.cpp does the same: norms
    and biases are tiny and precision-sensitive); a row that is not a whole number of q8_0 blocks
    falls back to f16, as in convert_hf_to_gguf.py."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if data.ndim <= 1:
        return data.astype(np.float32), None
    if quant == "f16":
        return data.astype(np.float16), None
    if quant == "bf16":
        return quants.quantize(data, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    try:
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    except quants.QuantError:
        return data.astype(np.float16), None


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    return theta, params


def llama3_rope_factors(params: dict[str, Any], theta: float, head_dim: int) -> Any:
    """The `rope_freqs.weight` llama.cpp reads for Llama 3.1+ rope scaling (convert_hf_to_gguf.py)."""
    import numpy as np

    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    out = []
    for freq in 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _add_hparams(w: Any, arch: Arch, config: dict[str, Any], n_vocab: int) -> tuple[int, int, int]:
    from gguf import RopeScalingType

    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(n_vocab)
    theta, rope = _rope(config)
    w.add_rope_freq_base(theta)
    if arch.gguf_name == "llama":
        w.add_rope_dimension_count(head_dim)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3 is a tensor, added with the weights
        raise GGUFExportError(
            f"GGUF export does not support rope type '{kind}' (config.json rope_parameters); "
            "it supports default, linear, yarn and llama3"
        )
    return n_head, n_kv, head_dim


def _add_tensors(w: Any, arch: Arch, model_dir: Path, config: dict[str, Any], quant: str) -> None:
    from gguf import MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, get_tensor_name_map

    arch_enum = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch.gguf_name)
    names = get_tensor_name_map(arch_enum, int(config["num_hidden_layers"]))
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    tied = bool(config.get("tie_word_embeddings", False))
    for key, data in _read_state_dict(model_dir):
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp (and transformers' loader) read a missing output.weight as tied
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"{model_dir}: tensor '{key}' has no GGUF name for {arch.gguf_name}")
        module = name.rsplit(".", 1)[0]  # weights and biases alike, as convert_hf_to_gguf.py does
        if arch.permute_qk and module.endswith(".attn_q"):
            data = permute_qk(data, n_head, n_head)
        elif arch.permute_qk and module.endswith(".attn_k"):
            data = permute_qk(data, n_head, n_kv)
        array, raw_dtype = _encode(data, quant)
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    theta, rope = _rope(config)
    if (rope.get("rope_type") or rope.get("type")) == "llama3":
        head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
        w.add_tensor(
            TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(rope, theta, head_dim)
        )


# --------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_pre(pre_tokenizer: dict[str, Any] | None) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` name for a tokenizer.json pre-tokenizer, or None if unknown."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}.get(pattern)
    return None


def _add_tokenizer(w: Any, model_dir: Path, n_vocab: int, log: Callable[[str], None]) -> None:
    from gguf import SpecialVocab, TokenType

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(
            f"{model_dir}: no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer"
        )
    tok = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = tok.get("model") or {}, tok.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            f"{path}: GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, SmolLM2), not this "
            f"{model.get('type')} tokenizer with a {decoder.get('type')} decoder (SentencePiece, as in "
            "Llama 2 and Mistral, is not supported yet): use --format hf and llama.cpp's converter"
        )
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if max(by_id) >= n_vocab:
        raise GGUFExportError(
            f"{path}: the tokenizer has token id {max(by_id)} but the model's embedding has {n_vocab} rows"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, TokenType.NORMAL) if i in by_id else TokenType.UNUSED for i in range(n_vocab)]
    w.add_tokenizer_model("gpt2")
    pre = tokenizer_pre(tok.get("pre_tokenizer"))
    if pre is None:
        log(
            "warning: the tokenizer's pre-tokenizer is not one llama.cpp names (gpt-2, smollm, qwen2, "
            "llama-bpe); tokenizer.ggml.pre is left out and llama.cpp falls back to its default split"
        )
    else:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    special = SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise GGUFExportError(f"{path}: a BPE tokenizer without merges cannot be exported")
    special.add_to_gguf(w, quiet=True)
    if special.chat_template is None:
        log("warning: the tokenizer has no chat template; the GGUF and the Modelfile carry none")


# --------------------------------------------------------------------------------------------
# the file


def write_gguf(
    model_dir: Path,
    out_file: Path,
    quant: str = DEFAULT_QUANT,
    name: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the merged HF model folder `model_dir` as `out_file` in `quant` (f16, bf16, q8_0)."""
    import gguf

    check_quant(quant)
    config = json.loads((model_dir / "config.json").read_text())
    arch = check_architecture(str(config.get("model_type")))
    file_type = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[quant]
    n_vocab = int(config["vocab_size"])
    out_file = out_file.resolve()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, arch.gguf_name)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or model_dir.name)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(w, arch, config, n_vocab)
        _add_tokenizer(w, model_dir, n_vocab, log)
        _add_tensors(w, arch, model_dir, config, quant)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    tmp.replace(out_file)
    return out_file


# --------------------------------------------------------------------------------------------
# Ollama Modelfile


@dataclass(frozen=True)
class TemplateFamily:
    name: str
    go_template: str  # Ollama's Go template over .Messages (it always ends with the assistant cue)
    stops: tuple[str, ...]

    def render(self, messages: list[dict[str, str]]) -> str:
        """The same text `go_template` renders (used to recognise the tokenizer's template)."""
        if self.name == "chatml":
            body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return body + "<|im_start|>assistant\n"
        body = "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
        )
        return body + "<|start_header_id|>assistant<|end_header_id|>\n\n"


TEMPLATE_FAMILIES = (
    TemplateFamily(
        "chatml",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n",
        ("<|im_end|>", "<|im_start|>"),
    ),
    # Llama 3.0; llama.cpp adds <|begin_of_text|> itself (add_bos_token), so the template does not.
    TemplateFamily(
        "llama3",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|start_header_id|>"),
    ),
)

_PROBES = (
    [{"role": "user", "content": "Hi there."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ],
)


def _default_system(tokenizer: Any, rendered_no_system: str, family: TemplateFamily) -> str | None:
    """The system message the template adds when a conversation has none (SmolLM2 and Qwen2.5 do)."""
    probe = _PROBES[0]
    if rendered_no_system == family.render(probe):
        return None
    head = family.render([{"role": "system", "content": "\x00"}]).split("\x00")[0]
    if rendered_no_system.startswith(head):
        tail = family.render([{"role": "system", "content": "\x00"}, *probe]).split("\x00")[1]
        end = rendered_no_system.find(tail, len(head))
        if end > 0:
            return rendered_no_system[len(head) : end]
    return None


def match_template(tokenizer: Any) -> tuple[TemplateFamily, str | None] | None:
    """(family, default system message) whose Go template renders exactly what the tokenizer's
    chat template renders for the probe conversations, or None."""
    # A BOS the tokenizer adds by itself (Llama 3) is llama.cpp's to add too, not the template's;
    # one it does not add (SmolLM2's <|im_start|>) is ordinary template text.
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and tokenizer("x")["input_ids"][:1] == [bos_id]
    bos = tokenizer.bos_token if adds_bos else ""

    def hf(messages: list[dict[str, str]]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text[len(bos) :] if bos and text.startswith(bos) else text

    try:
        rendered = [hf(p) for p in _PROBES]
    except Exception:  # a template that raises on a plain conversation: nothing to translate
        return None
    for family in TEMPLATE_FAMILIES:
        system = _default_system(tokenizer, rendered[0], family)
        with_default = [{"role": "system", "content": system}] if system is not None else []
        if rendered[0] == family.render(with_default + _PROBES[0]) and rendered[1] == family.render(
            _PROBES[1]
        ):
            return family, system
    return None


def _quote(text: str) -> str:
    if '"""' in text:
        raise GGUFExportError(
            'the chat template or system message contains """, which a Modelfile cannot quote'
        )
    return f'"""{text}"""'


def modelfile_text(model_dir: Path, gguf_name: str, log: Callable[[str], None] = print) -> str:
    """An Ollama Modelfile for `gguf_name` next to it: template, stop tokens, default parameters."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    lines = [
        "# written by `tunepipe export --format gguf`; run: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
    ]
    stops: list[str] = []
    found = match_template(tok) if tok.chat_template else None
    if found is None:
        log(
            "warning: the chat template is not ChatML or Llama 3; the Modelfile has no TEMPLATE and "
            "Ollama picks one from the GGUF's tokenizer.chat_template"
        )
        lines.append("# no TEMPLATE: the chat template is not ChatML or Llama 3 (Ollama reads the GGUF's)")
    else:
        family, system = found
        lines.append(f"TEMPLATE {_quote(family.go_template)}")
        if system is not None:
            lines.append(f"SYSTEM {_quote(system)}")
        stops += family.stops
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = GenerationConfig()
    eos = gen.eos_token_id if gen.eos_token_id is not None else config.get("eos_token_id")
    for token_id in eos if isinstance(eos, list) else [eos] if eos is not None else []:
        text = tok.convert_ids_to_tokens(int(token_id))
        if text and text not in stops:
            stops.append(text)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if gen.do_sample:
        lines.append(f"PARAMETER temperature {gen.temperature if gen.temperature is not None else 1.0}")
        if gen.top_p is not None:
            lines.append(f"PARAMETER top_p {gen.top_p}")
        if gen.top_k:
            lines.append(f"PARAMETER top_k {gen.top_k}")
    else:
        lines += ["# greedy, as `tunepipe chat` and the eval stage answer", "PARAMETER temperature 0"]
    lines.append(f"PARAMETER num_ctx {min(int(config.get('max_position_embeddings') or 4096), 4096)}")
    return "\n".join(lines) + "\n"


def export_gguf(
    model_dir: Path,
    out: Path,
    quant: str = DEFAULT_QUANT,
    name: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """`out/model-<quant>.gguf` and `out/Modelfile` from the merged HF folder `model_dir`.
    Returns the GGUF file."""
    out.mkdir(parents=True, exist_ok=True)
    file = write_gguf(model_dir, out / gguf_file_name(quant), quant, name=name, log=log)
    text = modelfile_text(model_dir, file.name, log=log)
    tmp = out / ".Modelfile.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / "Modelfile")
    return file
