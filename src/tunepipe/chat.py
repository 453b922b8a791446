"""`tunepipe chat`: talk to a run's model (the latest trained stage by default) or to a model folder,
through its chat template, keeping the conversation history.

A config resolves to its run folder: `--stage` picks base or a trained stage; by default the latest
stage of `pipeline:` that has finished (e.g. dpo, then sft, then the base model). A folder is a
Hugging Face model folder, a PEFT adapter folder (its base model is loaded and the adapter
applied), or an `export` output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.chat import render
from .evaluation import generate
from .metrics import strip_thinking


class ChatError(ValueError):
    """Nothing to chat with: no such file or folder, or the stage asked for is not trained (exit 2)."""


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    label: str  # what was loaded, for the banner
    enable_thinking: bool | None = None


def _stage_done(run_dir: Path, stage: str) -> bool:
    sj = run_dir / stage / "stage.json"
    return sj.is_file() and json.loads(sj.read_text()).get("status") == "done"


def load_from_config(
    config: Path, overrides: list[str], stage: str | None, smoke: bool, log: Any = print
) -> ChatModel:
    from .config import load_config
    from .modeling import load_stage_model, load_tokenizer, plan_for
    from .pipeline import run_dir_for
    from .stages import registry

    cfg = load_config(config, overrides)
    run_dir = run_dir_for(cfg, smoke)
    models = registry.model_names(cfg)
    if stage is None:
        stage = next((s for s in reversed(models) if s == "base" or _stage_done(run_dir, s)), "base")
    elif stage not in models:
        raise ChatError(f"--stage {stage!r}: this config's models are {', '.join(models)}")
    elif stage != "base" and not _stage_done(run_dir, stage):
        raise ChatError(
            f"{run_dir / stage}: the {stage} stage has not finished; "
            f"run `tunepipe run {config}` (or --stage base)"
        )
    tok = load_tokenizer(cfg, log=lambda _m: None)
    model = load_stage_model(cfg, plan_for(cfg.model), run_dir, stage, log=lambda _m: None).eval()
    where = cfg.model.name_or_path if stage == "base" else str(run_dir / stage)
    return ChatModel(model, tok, f"{stage} model ({where})", cfg.model.enable_thinking)


def load_from_folder(folder: Path, trust_remote_code: bool = False) -> ChatModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file():
        from peft import PeftModel

        base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base:
            raise ChatError(f"{adapter_cfg}: no base_model_name_or_path; chat with the run's config instead")
        model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
        tok_src = folder if (folder / "tokenizer_config.json").is_file() else Path(base)
        tok = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code)
        return ChatModel(model.eval(), tok, f"{base} + adapter {folder}")
    if not (folder / "config.json").is_file():
        raise ChatError(f"{folder}: not a model folder (no config.json) and not an adapter folder")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return ChatModel(model.eval(), tok, str(folder))


@dataclass
class Conversation:
    chat: ChatModel
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    history: list[dict[str, str]] = field(default_factory=list)
    last_reply: str = ""  # the cleaned reply of the last `stream` turn

    def prompt(self, text: str) -> str:
        """The chat-template prompt of the next turn: system message, history, the user's text."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        return render(
            self.chat.tokenizer,
            messages,
            add_generation_prompt=True,
            enable_thinking=self.chat.enable_thinking,
        )

    def remember(self, text: str, raw: str) -> str:
        """The cleaned reply of a raw completion (thinking and whitespace stripped), added with the
        user's text to the history."""
        reply = strip_thinking(raw).strip()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply

    def ask(self, text: str) -> str:
        """One turn: the user's text in, the model's reply out; both join the history."""
        prompt = self.prompt(text)
        sample = self.temperature > 0
        raw = generate(
            self.chat.model,
            self.chat.tokenizer,
            [prompt],
            self.max_new_tokens,
            1,
            do_sample=sample,
            temperature=self.temperature if sample else 1.0,
        )[0]
        return self.remember(text, raw)

    def stream(self, text: str) -> Iterator[str]:
        """One turn like `ask`, greedy (or sampled at `temperature`), yielding the reply's text as it is
        generated (tunepipe ui's chat panel). The joined pieces are the raw completion; the history
        gets the same cleaned reply `ask` returns."""
        import threading

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from .evaluation import generation_config

        prompt = self.prompt(text)
        tok, model = self.chat.tokenizer, self.chat.model
        sample = self.temperature > 0
        gen_cfg = generation_config(
            model, tok, self.max_new_tokens, sample, self.temperature if sample else 1.0
        )
        enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        out: dict[str, Any] = {}
        stop = threading.Event()  # the reader went away (a closed page): generate no further

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        def work() -> None:
            try:
                with torch.no_grad():
                    out["ids"] = model.generate(
                        **enc,
                        generation_config=gen_cfg,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([Stopped()]),
                    )
            except BaseException as e:  # surfaced to the caller after the stream ends
                out["error"] = e
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()
            thread.join()
        if "error" in out:
            raise out["error"]
        raw = tok.decode(out["ids"][0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        self.last_reply = self.remember(text, raw)

    def reset(self) -> None:
        self.history.clear()
