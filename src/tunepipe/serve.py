"""`tunepipe serve`: an OpenAI-compatible HTTP server over a run's model (or a model folder):
`GET /v1/models`, `POST /v1/chat/completions` (streamed or not) and `POST /v1/completions`.

Chat prompts go through the run's chat template exactly as `tunepipe chat` renders them, and a chat
reply's content is what `Conversation.ask` returns (thinking stripped, whitespace trimmed), so a
greedy request answers what `tunepipe chat --prompt` prints. A streamed reply's pieces join to the
same content.

Backends: transformers (tested) runs every generation on one worker thread; requests waiting for it
with the same sampling settings are decoded together as one left-padded batch (each row with its own
token limit, stop strings and end; streamed requests batch too). vLLM (untested here: it needs a CUDA
GPU) is used when it imports and CUDA is available, with the run's adapter as a LoRA module.

Why the standard library's server: like `tunepipe ui`, the API is a few JSON routes and a server-sent
event stream; ThreadingHTTPServer (a thread per connection) does that without an ASGI stack.

Security: binds 127.0.0.1 by default and then answers only loopback Host headers (no DNS rebinding);
any other bind refuses to start without an API key, then checked on every request
(`Authorization: Bearer KEY`, compared in constant time). The key is never printed or logged. Every
problem with a request is an OpenAI-shaped error with a 4xx code; an unexpected failure is a 500 with
a one-line message, the traceback only on the server's stderr (redacted).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .metrics import strip_thinking
from .redaction import redact_text

MAX_BODY = 4 * 1024 * 1024  # bytes: a prompt far longer than any context fits well within this
DEFAULT_MAX_TOKENS = 256  # a request without max_tokens: `tunepipe chat`'s default
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
ROLES = ("system", "user", "assistant")
# Chat-completion fields read or accepted as no-ops; any other field is ignored, as OpenAI's servers do
# with fields they do not know. Fields that would change the answer and are not supported are refused.
UNSUPPORTED_IF_SET = {
    "tools": "tool calling",
    "functions": "function calling",
    "logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "echo": "echo",
    "suffix": "suffix",
    "best_of": "best_of",
}


class ServeError(ValueError):
    """The server cannot start as asked (bind without an API key, backend missing): exit 2."""


class APIError(Exception):
    """A request problem, answered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type_

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": redact_text(str(self)),
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Anything but loopback is reachable from other machines: it needs a key."""
    if not is_loopback(host) and not api_key:
        raise ServeError(
            f"--host {host} is reachable from other machines: give an API key with --api-key KEY "
            "(or the TUNEPIPE_API_KEY environment variable); clients then send "
            "`Authorization: Bearer KEY`. Or bind --host 127.0.0.1"
        )


# ---------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def batch_key(self) -> tuple[Any, ...] | None:
        """Requests with the same key may share a batch. A seeded sampled request runs alone: its
        random stream must not depend on what else is waiting."""
        if not self.do_sample:
            return ("greedy",)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p)


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # the most a request may ask for (--max-tokens-limit)
    max_prompt_tokens: int  # the longest prompt accepted, in tokens (--max-prompt-tokens)


@dataclass(eq=False)
class Job:
    """One completion to generate; its events go to the request's thread."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stops: tuple[str, ...] = ()
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    batch_size: int = 1  # how many rows its batch had (the access log shows it)

    def results(self) -> Iterator[tuple[str, Any]]:
        """("tokens", [ids]) as they are generated, then ("done", finish_reason) or ("error", message)."""
        while True:
            kind, value = self.events.get()
            yield kind, value
            if kind != "tokens":
                return


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _opt(body: dict[str, Any], key: str, check: Callable[[Any], bool], what: str) -> Any:
    v = body.get(key)
    if v is not None and not check(v):
        raise APIError(400, f"'{key}' must be {what}, got {json.dumps(v)[:80]}", param=key)
    return v


def parse_sampling(body: dict[str, Any], limits: Limits) -> tuple[int | None, Sampling, tuple[str, ...]]:
    """max_tokens (None: not given), sampling settings and stop strings of a chat or text completion
    request."""
    for key, what in UNSUPPORTED_IF_SET.items():
        if body.get(key) not in (None, False, [], 0):
            raise APIError(400, f"'{key}': {what} is not supported by tunepipe serve", param=key)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(
            400, "'response_format': only {type: text} is supported (no JSON mode)", param="response_format"
        )
    n = _opt(body, "n", _is_int, "an integer")
    if n not in (None, 1):
        raise APIError(400, "'n': only one choice per request (n=1) is supported", param="n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _opt(body, key, _is_int, "an integer")
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(
            400,
            f"'{key}' must be between 1 and {limits.max_tokens} (this server's --max-tokens-limit), "
            f"got {max_tokens}",
            param=key,
        )
    temperature = _opt(body, "temperature", _is_num, "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be between 0 and 2, got {temperature}", param="temperature")
    top_p = _opt(body, "top_p", _is_num, "a number")
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    seed = _opt(body, "seed", _is_int, "an integer")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(s for s in stop if s)
    else:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    _opt(body, "stream", lambda v: isinstance(v, bool), "true or false")
    so = _opt(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    if so is not None:
        _opt(so, "include_usage", lambda v: isinstance(v, bool), "true or false")
    return (
        max_tokens,
        Sampling(float(temperature or 0.0), float(top_p if top_p is not None else 1.0), seed),
        stops,
    )


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages as the chat template takes them: role and text content. Content may be a
    string or a list of text parts (the newer OpenAI form); images and other parts are refused."""
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required: a list of {role, content}", param="messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{where}' must be an object with role and content", param=where)
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise APIError(
                400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role"
            )
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise APIError(
                    400,
                    f"'{where}.content': only text parts ({{type: text, text}}) are supported",
                    param=f"{where}.content",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"'{where}.content' must be a string", param=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def parse_prompts(body: dict[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise APIError(400, "'prompt' is required: a string or a non-empty list of strings", param="prompt")


# ------------------------------------------------------------------------------------ reply text


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of a growing text may still change: the start of a stop string,
    an incomplete UTF-8 character (decoded as U+FFFD) or the start of a <think> tag."""
    # Trailing whitespace too: a chat reply is trimmed, and decoders that tidy spaces before
    # punctuation may drop it once the next token is there.
    hold = len(text) - len(text.rstrip("\ufffd \t\r\n"))
    for s in (*stops, "<think>"):
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def reply_text(raw: str, stops: tuple[str, ...], chat: bool, final: bool) -> tuple[str, bool]:
    """(the visible text, whether a stop string ended it) of a completion's decoded text. Cut at the
    first stop string; a chat reply is cleaned like `Conversation.ask` (no thinking, trimmed). Before
    the end (`final` False) only what cannot change any more: every partial text's result is a prefix
    of the final one, so streamed pieces join to the non-streamed content."""
    cut = [raw.find(s) for s in stops if s in raw]
    stopped = bool(cut)
    text = raw[: min(cut)] if cut else raw
    if not final and not stopped:
        text = text[: len(text) - _held_back(text, stops)]
    if chat:
        text = strip_thinking(text)  # also trims: the result `Conversation.ask` gives
    return text, stopped


# ------------------------------------------------------------------------------------ backends


class TokenizerGuard:
    """The tokenizer, used from many threads: one call at a time (a fast tokenizer raises "Already
    borrowed" when two threads use it at once)."""

    def __init__(self, tokenizer: Any, enable_thinking: bool | None):
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.lock = threading.Lock()

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        from .data.chat import render

        with self.lock:
            text = render(
                self.tokenizer, messages, add_generation_prompt=True, enable_thinking=self.enable_thinking
            )
            # The template already holds the special tokens, as in `tunepipe chat`.
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_prompt(self, text: str) -> list[int]:
        with self.lock:  # a raw prompt gets the tokenizer's BOS, as other servers give it
            return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))


class _Rows:
    """Per-row bookkeeping of one batch, called by `generate` after every step as a stopping
    criterion: hands each row's new token to its request and ends the row at its own end (an
    end-of-turn token, its max_tokens, a stop string, a client gone), so rows of one batch behave as
    if each ran alone."""

    def __init__(self, jobs: list[Job], eos: set[int], tok: TokenizerGuard):
        self.jobs, self.eos, self.tok = jobs, eos, tok
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.done = [False] * len(jobs)

    def _finish(self, i: int, reason: str) -> None:
        self.done[i] = True
        self.jobs[i].events.put(("done", reason))

    def _stopped(self, i: int) -> bool:
        return reply_text(self.tok.decode(self.ids[i]), self.jobs[i].stops, chat=False, final=True)[1]

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        last = input_ids[:, -1].tolist()
        for i, job in enumerate(self.jobs):
            if self.done[i]:
                continue
            t = last[i]
            self.ids[i].append(t)
            job.events.put(("tokens", [t]))
            if t in self.eos or (job.stops and self._stopped(i)):
                self._finish(i, "stop")
            elif len(self.ids[i]) >= job.max_tokens:
                self._finish(i, "length")
            elif job.cancelled.is_set():
                self._finish(i, "cancelled")
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def close(self, error: str | None = None) -> None:
        for i in range(len(self.jobs)):
            if not self.done[i]:
                if error:
                    self.done[i] = True
                    self.jobs[i].events.put(("error", error))
                else:
                    self._finish(i, "length")


class Engine:
    """The generation worker: one thread runs the model; waiting requests with the same sampling
    settings are decoded together (up to `max_batch` rows)."""

    name = "transformers"

    def __init__(self, max_batch: int):
        self.max_batch = max(1, max_batch)
        self._pending: list[Job] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._loop, name="tunepipe-serve-generate", daemon=True).start()

    def submit(self, jobs: list[Job]) -> None:
        with self._cv:
            self._pending.extend(jobs)
            self._cv.notify()

    def _take(self) -> list[Job]:
        with self._cv:
            while not self._pending:
                self._cv.wait()
            first = self._pending.pop(0)
            batch = [first]
            key = first.sampling.batch_key()
            if key is not None:
                for job in list(self._pending):
                    if len(batch) >= self.max_batch:
                        break
                    if job.sampling.batch_key() == key:
                        batch.append(job)
                        self._pending.remove(job)
        live = []
        for job in batch:  # a client that left while its request waited
            if job.cancelled.is_set():
                job.events.put(("done", "cancelled"))
            else:
                live.append(job)
        return live

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                continue
            for job in batch:
                job.batch_size = len(batch)
            try:
                self.generate(batch)
            except Exception as e:  # the requests get a 500; the server goes on
                print(redact_text(traceback.format_exc()), file=sys.stderr, flush=True)
                for job in batch:
                    job.events.put(("error", f"generation failed ({type(e).__name__})"))

    def generate(self, jobs: list[Job]) -> None:
        raise NotImplementedError


class TransformersEngine(Engine):
    def __init__(self, model: Any, tok: TokenizerGuard, max_batch: int):
        self.model, self.tok = model, tok
        super().__init__(max_batch)

    def generate(self, jobs: list[Job]) -> None:
        import torch
        from transformers import StoppingCriteriaList

        from .evaluation import generation_config

        s = jobs[0].sampling
        with self.tok.lock:  # it renders the template to find the end-of-turn token
            gen_cfg = generation_config(
                self.model,
                self.tok.tokenizer,
                max(j.max_tokens for j in jobs),
                s.do_sample,
                s.temperature if s.do_sample else 1.0,
                s.top_p,
            )
        # Left padding, as `evaluation.generate` pads: every prompt ends where the new tokens begin.
        # Built here rather than by the tokenizer, which the request threads are using.
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), gen_cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for r, job in enumerate(jobs):
            ids[r, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[r, width - len(job.prompt_ids) :] = 1
        eos = gen_cfg.eos_token_id
        rows = _Rows(jobs, set(eos if isinstance(eos, list) else [eos]), self.tok)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        try:
            with torch.no_grad():
                self.model.generate(
                    input_ids=ids.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    generation_config=gen_cfg,
                    stopping_criteria=StoppingCriteriaList([rows]),
                )
        except Exception as e:
            print(redact_text(traceback.format_exc()), file=sys.stderr, flush=True)
            rows.close(error=f"generation failed ({type(e).__name__})")
            return
        rows.close()


class VLLMEngine(Engine):  # pragma: no cover - needs vLLM and a CUDA GPU; untested on the CPU machines
    """vLLM's offline engine, fed by the same worker loop: all waiting requests go into one
    `LLM.generate` call (vLLM batches continuously inside it), the run's adapter as a LoRA module.
    A streamed request gets its reply in one piece when it is done."""

    name = "vllm"

    def __init__(self, model_path: str, lora_path: Path | None, tok: TokenizerGuard, max_batch: int):
        from vllm import LLM

        self.tok = tok
        self.lora = None
        kwargs: dict[str, Any] = {"model": model_path, "tokenizer": model_path}
        if lora_path is not None:
            from vllm.lora.request import LoRARequest

            rank = int(json.loads((lora_path / "adapter_config.json").read_text()).get("r", 16))
            kwargs.update(enable_lora=True, max_lora_rank=max(8, rank), max_loras=1)
            self.lora = LoRARequest("run-adapter", 1, str(lora_path))
        self.llm = LLM(**kwargs)
        from .evaluation import stop_token_ids

        self.stop_ids = stop_token_ids(None, tok.tokenizer)
        super().__init__(max(max_batch, 64))

    def generate(self, jobs: list[Job]) -> None:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                max_tokens=j.max_tokens,
                temperature=j.sampling.temperature,
                top_p=j.sampling.top_p if j.sampling.do_sample else 1.0,
                seed=j.sampling.seed,
                stop=list(j.stops) or None,
                stop_token_ids=self.stop_ids,
                include_stop_str_in_output=True,  # the handler cuts at the stop string itself
                skip_special_tokens=True,
            )
            for j in jobs
        ]
        prompts = [{"prompt_token_ids": j.prompt_ids} for j in jobs]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        for job, out in zip(jobs, outputs, strict=True):
            o = out.outputs[0]
            job.events.put(("tokens", list(o.token_ids)))
            job.events.put(("done", "length" if o.finish_reason == "length" else "stop"))


def vllm_usable() -> bool:
    """vLLM is installed and a CUDA GPU is visible."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


# ------------------------------------------------------------------------------------ loading


@dataclass
class Served:
    engine: Engine
    tok: TokenizerGuard
    model_id: str
    label: str
    default_prompt_limit: int  # --max-prompt-tokens when not given
    context: int | None  # the model's max_position_embeddings: prompt + reply must fit


def _resolve_stage(cfg: Any, run_dir: Path, stage: str | None) -> str:
    from .chat import ChatError, _stage_done
    from .stages import registry

    models = registry.model_names(cfg)
    if stage is None:  # the same choice `tunepipe chat` makes
        return next((s for s in reversed(models) if s == "base" or _stage_done(run_dir, s)), "base")
    if stage not in models:
        raise ChatError(f"--stage {stage!r}: this config's models are {', '.join(models)}")
    return stage


def _vllm_weights(cfg: Any, run_dir: Path, stage: str) -> tuple[str, Path | None] | None:
    """(model folder or hub id, LoRA adapter folder or None) for vLLM; None when the stage stacks
    several adapters (vLLM applies one per request: serve an `export` folder instead)."""
    from .modeling import model_path
    from .stages import registry

    chain = registry.chain(cfg, stage)
    full = [i for i, s in enumerate(chain) if (run_dir / s / "model" / "config.json").is_file()]
    start = max(full, default=-1)
    base = str(run_dir / chain[start] / "model") if start >= 0 else model_path(cfg, log=lambda _m: None)
    adapters = chain[start + 1 :]
    if len(adapters) > 1:
        return None
    return base, (run_dir / adapters[0] / "adapter") if adapters else None


def load_served(
    target: Path,
    overrides: list[str],
    stage: str | None,
    smoke: bool,
    backend: str,
    max_batch: int,
    model_name: str | None,
    log: Callable[[str], None],
) -> Served:
    """Load what `tunepipe serve` serves: a config's stage (the latest finished by default) or a model
    / adapter / export folder, on vLLM or transformers."""
    from .chat import ChatError, load_from_config, load_from_folder

    if backend not in ("auto", "transformers", "vllm"):
        raise ServeError(f"--backend {backend!r}: choose auto, transformers or vllm")
    use_vllm = backend == "vllm" or (backend == "auto" and vllm_usable())
    if backend == "vllm" and not vllm_usable():
        raise ServeError(
            "--backend vllm: vLLM is not installed or no CUDA GPU is visible; use --backend auto"
        )
    if target.is_dir():
        if overrides:
            raise ChatError(f"KEY=VALUE overrides ({' '.join(overrides)}) need a config, not a model folder")
        if use_vllm:  # pragma: no cover - GPU only
            adapter = target if (target / "adapter_config.json").is_file() else None
            base = str(target)
            if adapter is not None:
                base = json.loads((target / "adapter_config.json").read_text())["base_model_name_or_path"]
            from transformers import AutoTokenizer

            has_tok = (target / "tokenizer_config.json").is_file()
            tok = TokenizerGuard(AutoTokenizer.from_pretrained(target if has_tok else base), None)
            return Served(
                VLLMEngine(base, adapter, tok, max_batch),
                tok,
                model_name or target.resolve().name,
                str(target),
                _max_positions(base),
                _max_positions(base),
            )
        chat = load_from_folder(target)
        context = _context(chat.model)
        tok = TokenizerGuard(chat.tokenizer, chat.enable_thinking)
        return Served(
            TransformersEngine(chat.model, tok, max_batch),
            tok,
            model_name or target.resolve().name,
            chat.label,
            context or 2048,
            context,
        )
    if not target.is_file():
        raise ChatError(f"{target}: no such config file or model folder")
    from .config import load_config
    from .pipeline import run_dir_for

    cfg = load_config(target, overrides)
    run_dir = run_dir_for(cfg, smoke)
    stage = _resolve_stage(cfg, run_dir, stage)
    model_id = model_name or f"{cfg.project.name}-{stage}"
    if use_vllm:  # pragma: no cover - GPU only
        from .modeling import load_tokenizer

        weights = _vllm_weights(cfg, run_dir, stage)
        if weights is None:
            log(f"vLLM applies one adapter per request and {stage} stacks several: using transformers")
        else:
            tok = TokenizerGuard(load_tokenizer(cfg, log=lambda _m: None), cfg.model.enable_thinking)
            return Served(
                VLLMEngine(weights[0], weights[1], tok, max_batch),
                tok,
                model_id,
                f"{stage} model ({run_dir / stage if stage != 'base' else weights[0]})",
                cfg.data.max_length,
                _max_positions(weights[0]),
            )
    chat = load_from_config(target, overrides, stage, smoke, log=lambda _m: None)
    tok = TokenizerGuard(chat.tokenizer, chat.enable_thinking)
    engine = TransformersEngine(chat.model, tok, max_batch)
    return Served(engine, tok, model_id, chat.label, cfg.data.max_length, _context(chat.model))


def _context(model: Any) -> int | None:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _max_positions(path: str) -> int:  # pragma: no cover - vLLM path
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None) or 2048)


# ------------------------------------------------------------------------------------ HTTP


class ServeApp:
    def __init__(self, served: Served, limits: Limits, api_key: str | None, loopback: bool):
        self.served, self.limits, self.api_key, self.loopback = served, limits, api_key, loopback
        self.created = int(time.time())

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.served.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "tunepipe",
        }

    def check_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None:
            return self.served.model_id
        if not isinstance(model, str):
            raise APIError(400, "'model' must be a string", param="model")
        if model != self.served.model_id:
            raise APIError(
                404,
                f"the model {model!r} does not exist here; this server serves {self.served.model_id!r}",
                param="model",
                code="model_not_found",
            )
        return model

    def fit(self, ids: list[int], param: str, max_tokens: int | None) -> int:
        """The reply's token limit for a prompt: the request's max_tokens, or the default (256, as
        `tunepipe chat`) cut to what the model's context has left. A prompt over --max-prompt-tokens,
        or a prompt and max_tokens that together overflow the context, is refused."""
        limit, context = self.limits.max_prompt_tokens, self.served.context
        if len(ids) > limit:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens; this server accepts at most {limit} (--max-prompt-tokens)",
                param=param,
                code="context_length_exceeded",
            )
        room = context - len(ids) if context else None
        if room is not None and room < 1:
            raise APIError(
                400,
                f"the prompt ({len(ids)} tokens) fills the model's context of {context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.limits.max_tokens, room or DEFAULT_MAX_TOKENS)
        elif room is not None and max_tokens > room:
            raise APIError(
                400,
                f"the model's context is {context} tokens; the prompt ({len(ids)}) and max_tokens "
                f"({max_tokens}) do not fit in it",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens


class Handler(BaseHTTPRequestHandler):
    server_version = "tunepipe-serve"
    protocol_version = "HTTP/1.1"
    app: ServeApp  # set on the subclass made by `make_server`

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return  # one access line per request is written by `_dispatch`

    # ------------------------------------------------------------------ plumbing

    def _send_json(self, obj: Any, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._status = status

    def _authorize(self) -> None:
        app = self.app
        if app.loopback:
            host = (self.headers.get("Host") or "").strip()
            host = (
                host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            )
            if not is_loopback(host):  # another name resolving to 127.0.0.1: DNS rebinding
                raise APIError(403, f"Host {host!r} refused: this server answers on 127.0.0.1 / localhost")
        if app.api_key is None:
            return
        auth = self.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), app.api_key.encode()):
            raise APIError(
                401,
                "a valid API key is needed: send `Authorization: Bearer KEY` with the server's --api-key"
                if not given
                else "incorrect API key provided",
                code="invalid_api_key",
            )

    def _body(self) -> dict[str, Any]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise APIError(411, "send the request body with a Content-Length (chunked bodies are not read)")
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise APIError(400, "the Content-Length header is not a number") from None
        if n > MAX_BODY:
            self.close_connection = True  # the body is left unread
            raise APIError(413, f"the request body is {n} bytes; at most {MAX_BODY} are accepted")
        raw = self.rfile.read(n) if n > 0 else b""
        self._body_read = True
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def _dispatch(self, method: str) -> None:
        t0 = time.monotonic()
        self._status: int | None = None
        self._note = ""
        self._body_read = False
        try:
            self._authorize()
            self._route(method, self.path.split("?", 1)[0].rstrip("/"))
        except APIError as e:
            if not self._body_read and self.headers.get("Content-Length", "0") != "0":
                self.close_connection = True  # an unread body would be taken for the next request
            with contextlib.suppress(OSError):
                self._send_json(e.body(), e.status)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # never a traceback to the client
            print(redact_text(traceback.format_exc()), file=sys.stderr, flush=True)
            err = APIError(500, f"internal error ({type(e).__name__}); the server's log has the details")
            err.type = "server_error"
            with contextlib.suppress(OSError):
                self._send_json(err.body(), 500)
        finally:
            path = self.path.split("?", 1)[0][:200]
            took = time.monotonic() - t0
            print(f"{method} {path} {self._status} {took:.2f}s{self._note}", file=sys.stderr, flush=True)

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    # ------------------------------------------------------------------ routes

    def _route(self, method: str, path: str) -> None:
        routes = {
            "/v1/models": "GET",
            "/v1/chat/completions": "POST",
            "/v1/completions": "POST",
            "/health": "GET",
        }
        want = routes.get(path) or ("GET" if path.startswith("/v1/models/") else None)
        if want is None:
            raise APIError(404, f"no route {path or '/'}; this server has {', '.join(routes)}")
        if method != want:
            raise APIError(405, f"{path} takes {want}, not {method}")
        app = self.app
        if path == "/health":
            return self._send_json({"status": "ok", "model": app.served.model_id})
        if path == "/v1/models":
            return self._send_json({"object": "list", "data": [app.model_card()]})
        if path.startswith("/v1/models/"):
            from urllib.parse import unquote

            if unquote(path[len("/v1/models/") :]) != app.served.model_id:
                raise APIError(404, "no such model", param="model", code="model_not_found")
            return self._send_json(app.model_card())
        body = self._body()
        if path == "/v1/chat/completions":
            return self._chat(body)
        return self._completions(body)

    def _usage(self, prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chat(self, body: dict[str, Any]) -> None:
        app = self.app
        model = app.check_model(body)
        messages = parse_messages(body)
        max_tokens, sampling, stops = parse_sampling(body, app.limits)
        try:
            ids = app.served.tok.chat_prompt(messages)
        except Exception as e:  # the template rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        job = Job(ids, app.fit(ids, "messages", max_tokens), sampling, stops)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        app.served.engine.submit([job])
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._stream(job, base, chat=True, include_usage=usage)
        text, reason, n = self._collect(job)
        self._note = f" prompt={len(ids)} completion={n} batch={job.batch_size}"
        self._send_json(
            {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": reason,
                    }
                ],
                "usage": self._usage(len(ids), n),
            }
        )

    def _completions(self, body: dict[str, Any]) -> None:
        app = self.app
        model = app.check_model(body)
        prompts = parse_prompts(body)
        max_tokens, sampling, stops = parse_sampling(body, app.limits)
        if body.get("stream") and len(prompts) > 1:
            raise APIError(400, "'stream' takes one prompt, not a list", param="prompt")
        encoded = [app.served.tok.text_prompt(p) for p in prompts]
        jobs = [Job(ids, app.fit(ids, "prompt", max_tokens), sampling, stops) for ids in encoded]
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        app.served.engine.submit(jobs)
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._stream(jobs[0], base, chat=False, include_usage=usage)
        choices, total = [], 0
        for i, job in enumerate(jobs):
            text, reason, n = self._collect(job, chat=False)
            total += n
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        prompt_tokens = sum(len(ids) for ids in encoded)
        self._note = f" prompt={prompt_tokens} completion={total} batch={max(j.batch_size for j in jobs)}"
        self._send_json(
            {
                **base,
                "object": "text_completion",
                "choices": choices,
                "usage": self._usage(prompt_tokens, total),
            }
        )

    def _collect(self, job: Job, chat: bool = True) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens) of a finished job."""
        ids: list[int] = []
        for kind, value in job.results():
            if kind == "tokens":
                ids += value
            elif kind == "error":
                raise APIError(500, value, type_="server_error")
            else:
                text, _ = reply_text(self.app.served.tok.decode(ids), job.stops, chat, final=True)
                return text, value, len(ids)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ streams

    def _stream(self, job: Job, base: dict[str, Any], chat: bool, include_usage: bool) -> None:
        """Server-sent events: a chunk per new piece of text, a last one with finish_reason, the usage
        when asked (stream_options.include_usage), then `data: [DONE]`."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def choice(text: str | None, reason: str | None = None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        def send(payload: Any) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._status = 200
        tok = self.app.served.tok
        ids: list[int] = []
        sent = ""
        pieces = 0
        try:
            if chat:
                first = {**choice(""), "delta": {"role": "assistant", "content": ""}}
                send({**base, "object": obj, "choices": [first]})
            for kind, value in job.results():
                if kind == "error":
                    send(APIError(500, value, type_="server_error").body())
                    break
                if kind == "tokens":
                    ids += value
                    text, _ = reply_text(tok.decode(ids), job.stops, chat, final=False)
                    reason = None
                else:
                    text, _ = reply_text(tok.decode(ids), job.stops, chat, final=True)
                    reason = value
                if text.startswith(sent) and len(text) > len(sent):
                    send({**base, "object": obj, "choices": [choice(text[len(sent) :])]})
                    sent, pieces = text, pieces + 1
                elif not text.startswith(sent):  # cannot happen by reply_text's contract; say so
                    print(f"stream: a piece changed after it was sent ({len(sent)} chars)", file=sys.stderr)
                if reason is not None:
                    send({**base, "object": obj, "choices": [choice(None, reason)]})
                    if include_usage:
                        send(
                            {
                                **base,
                                "object": obj,
                                "choices": [],
                                "usage": self._usage(len(job.prompt_ids), len(ids)),
                            }
                        )
            send("[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()  # the client is gone: its row stops at the next step
        counts = f"prompt={len(job.prompt_ids)} completion={len(ids)}"
        self._note = f" stream {counts} pieces={pieces} batch={job.batch_size}"


def make_server(app: ServeApp | None, host: str, port: int) -> ThreadingHTTPServer:
    """The server, bound and not yet serving. `app` may be set later on `server.RequestHandlerClass`
    (the CLI binds first, so that a busy port fails before a model loads)."""
    handler = type("BoundHandler", (Handler,), {"app": app})

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    return Server((host, port), handler)


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else str(host)
    if shown in ("0.0.0.0", "[::]"):
        shown = "127.0.0.1" if shown == "0.0.0.0" else "[::1]"
    return f"http://{shown}:{port}/v1"
