"""Does llama.cpp itself read tunepipe's GGUF the way the Hugging Face model means it?

    python bench/gguf_llamacpp.py [--model HF_FOLDER] [--quant f16|bf16|q8_0] [--new-tokens 24]

Exports the model (default: the embedded SmolLM2-135M-Instruct) with tunepipe.gguf_export, then
loads the file with llama-cpp-python (which builds llama.cpp from source on `pip install`; several
minutes) and compares, for a few chat prompts: the prompt token ids (llama.cpp's tokenizer against
the HF tokenizer, chat special tokens included), the greedy continuation token for token, and the
next-token logits of the prompt. The HF reference runs in fp32 with its 2-D weights rounded to the
file's type, as in tests/test_gguf.py. llama.cpp's CPU matmuls round the activations too (f16
weights meet f16-rounded activations; q8_0 weights meet activations quantized to 8 bits), so its
logits differ a little for f16 and more for q8_0, and a greedy near-tie can flip; the result says
how often and how far.

llama-cpp-python is not a tunepipe dependency. To try without touching the project environment:
    pip install --no-deps --target /tmp/llama-cpp-site llama-cpp-python diskcache
    PYTHONPATH=/tmp/llama-cpp-site python bench/gguf_llamacpp.py
Prints one JSON object and writes it to bench/results/gguf_llamacpp-<quant>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "What is 2 + 2? Answer with a number.",
    "Name three colours.",
    "Write one sentence about a river.",
    "What is the capital of France?",
]


def _rounded_reference(hf_dir: Path, quant: str):
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a Hugging Face model folder (default: the embedded SmolLM2)")
    ap.add_argument("--quant", default="f16", choices=["f16", "bf16", "q8_0"])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", help="result file (default bench/results/gguf_llamacpp-<quant>.json)")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed; see this script's docstring", file=sys.stderr)
        return 2
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from tunepipe.gguf_export import export_gguf
    from tunepipe.quickstart.model import resolve_model_path

    hf_dir = Path(args.model or resolve_model_path("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ref = _rounded_reference(hf_dir, args.quant)
    result: dict = {
        "model": hf_dir.name,
        "quant": args.quant,
        "llama_cpp_python": llama_cpp.__version__,
        "prompts": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        file = export_gguf(hf_dir, Path(tmp), args.quant, log=lambda _m: None)
        result["export_s"] = round(time.time() - t0, 2)
        result["gguf_bytes"] = file.stat().st_size
        llm = llama_cpp.Llama(str(file), n_ctx=512, logits_all=True, verbose=False, seed=0)
        for q in PROMPTS:
            text = tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            hf_ids = tok(text, add_special_tokens=False)["input_ids"]
            cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            ids = torch.tensor([hf_ids])
            with torch.no_grad():
                hf_first = ref(ids).logits[0, -1].numpy()
                hf_gen = ref.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False
                )[0, len(hf_ids) :].tolist()
            llm.reset()
            llm.eval(hf_ids)
            cpp_first = np.array(llm.scores[llm.n_tokens - 1])
            cpp_gen: list[int] = []
            eos = {tok.eos_token_id}
            for _ in range(args.new_tokens):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                cpp_gen.append(nxt)
                if nxt in eos:
                    break
                llm.eval([nxt])
            same = next((i for i, (a, b) in enumerate(zip(hf_gen, cpp_gen, strict=False)) if a != b), None)
            result["prompts"].append(
                {
                    "prompt": q,
                    "same_prompt_ids": cpp_ids == hf_ids,
                    "same_greedy": hf_gen == cpp_gen,
                    "first_divergence": same,
                    "max_abs_logit_diff": float(np.abs(hf_first - cpp_first).max()),
                    "logit_std": float(hf_first.std()),
                    "hf": tok.decode(hf_gen),
                    "llama_cpp": tok.decode(cpp_gen),
                }
            )
    result["all_prompt_ids_equal"] = all(p["same_prompt_ids"] for p in result["prompts"])
    result["greedy_equal"] = sum(p["same_greedy"] for p in result["prompts"])
    print(json.dumps(result, indent=2))
    out = Path(args.out or Path(__file__).parent / "results" / f"gguf_llamacpp-{args.quant}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
