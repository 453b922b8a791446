"""`tunepipe serve` through the real `openai` client: the real command serves a tiny model trained by the
real `tunepipe train` on 127.0.0.1; its chat replies equal `tunepipe chat --prompt`, streamed pieces join
to the same text, concurrent requests are batched and each gets its own answer, and bad requests get
OpenAI's error shape with a 4xx code."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tunepipe, write_config, write_jsonl

from tunepipe.serve import reply_text

try:
    import openai
except ImportError:  # pragma: no cover - the dev extra installs it
    openai = None  # type: ignore[assignment]

KEY = "test-serve-key-0123456789"
ANSWER = "The answer is forty two."
MODEL_ID = "test-sft"


# ------------------------------------------------------------------ no model


@pytest.mark.parametrize(
    ("raw", "stops", "chat"),
    [
        ("  The answer is forty two.  ", (), True),
        ("<think>\nlet me see </think>\n\nThe answer, is 42 .", (), True),
        ("Hi <think>x</think> there <think>unfinished", (), True),
        ("The answer is forty two. Q: and more", ("Q:",), True),
        ("x = 1\nEND y = 2", ("END", "y"), False),
        ("caf\ufffd\ufffd but then caf\u00e9", (), False),
        ("ends with a partial stop STO", ("STOP",), False),
    ],
)
def test_every_streamed_prefix_is_a_prefix_of_the_final_text(raw: str, stops: tuple[str, ...], chat: bool):
    final, _ = reply_text(raw, stops, chat, final=True)
    for n in range(len(raw) + 1):
        partial, _ = reply_text(raw[:n], stops, chat, final=False)
        assert final.startswith(partial), (raw[:n], partial, final)
    if chat:
        assert "<think>" not in final and final == final.strip()
    for s in stops:
        assert s not in final


@pytest.mark.multiproc
def test_a_public_bind_without_an_api_key_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "tunepipe.yaml"
    cfg.write_text("model: {name_or_path: nowhere}\n")
    r = tunepipe("serve", cfg, "--host", "0.0.0.0", "--port", "0", env={"TUNEPIPE_API_KEY": ""})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--host 0.0.0.0 is reachable from other machines" in r.stderr
    assert "--api-key" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ a trained model, served


def _train(tmp_path: Path, model: Path) -> Path:
    """Full fine-tuning on one constant answer: the tiny random model learns it in 24 steps, so its
    replies are real text of several tokens."""
    cfg = write_config(tmp_path, model, sft={"max_steps": 24, "method": "full", "learning_rate": 3e-3})
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": ANSWER},
            ]
        }
        for i in range(24)
    ]
    write_jsonl(tmp_path / "data" / "const.jsonl", rows)
    raw = yaml.safe_load(cfg.read_text())
    raw["pipeline"] = ["sft"]
    raw["data"]["sft"] = {"train": "data/const.jsonl", "eval": "data/const.jsonl"}
    raw["sft"].pop("lora")
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    for args in (("data", cfg), ("train", cfg, "--stage", "sft")):
        r = tunepipe(*args)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return cfg


class Served:
    def __init__(self, cfg: Path, url: str, proc: subprocess.Popen[str], log: Path):
        self.cfg, self.url, self.proc, self.log = cfg, url, proc, log
        host_port = url.split("//", 1)[1].split("/", 1)[0]
        self.host, self.port = host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1])

    def client(self, key: str = KEY) -> Any:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120)

    def raw(
        self, method: str, path: str, body: bytes | None = None, key: str | None = KEY
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3: Path) -> Iterator[Served]:
    if openai is None:
        pytest.skip("the openai client is not installed (pip install -e '.[dev]')")
    tmp_path = tmp_path_factory.mktemp("serve")
    cfg = _train(tmp_path, tiny_qwen3)
    log = tmp_path / "serve.err"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "TUNEPIPE_API_KEY": KEY}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunepipe", "serve", str(cfg), "--stage", "sft", "--port", "0"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        line = ""
        deadline = time.time() + 120
        while not line.startswith("tunepipe serve:") and time.time() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line and proc.poll() is not None:
                pytest.fail(f"tunepipe serve exited {proc.returncode}: {log.read_text()[-3000:]}")
        assert line.startswith("tunepipe serve: http://127.0.0.1:"), line
        yield Served(cfg, line.split()[2], proc, log)
    finally:
        proc.terminate()
        proc.wait(10)
    assert KEY not in log.read_text()  # the key is never logged


@pytest.mark.slow
@pytest.mark.multiproc
def test_models_lists_the_served_stage(served: Served) -> None:
    assert [m.id for m in served.client().models.list()] == [MODEL_ID]


@pytest.mark.slow
@pytest.mark.multiproc
def test_chat_completion_equals_tunepipe_chat_and_streams_the_same_text(served: Served) -> None:
    prompt = "What is 12 + 30?"
    cli = tunepipe("chat", served.cfg, "--stage", "sft", "--prompt", prompt)
    assert cli.returncode == 0, cli.stderr
    expected = cli.stdout.strip()
    assert len(expected.split()) >= 3, expected  # real text, not an immediate end of turn

    client = served.client()
    messages = [{"role": "user", "content": prompt}]
    r = client.chat.completions.create(model=MODEL_ID, messages=messages)
    assert r.object == "chat.completion" and r.model == MODEL_ID and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens >= 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(
        model=MODEL_ID, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert "".join(pieces) == expected
    assert len(pieces) > 1  # sent as it was generated, not as one block
    assert reasons == ["stop"]
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.slow
@pytest.mark.multiproc
def test_stop_strings_max_tokens_and_text_completions(served: Served) -> None:
    client = served.client()
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    full = client.chat.completions.create(model=MODEL_ID, messages=messages).choices[0].message.content
    assert len(full.split()) >= 3, full  # the trained answer (near "The answer is forty two.")

    stop = " " + full.split()[2]  # the third word, with the space before it
    expected = full[: full.index(stop)].strip()
    stopped = client.chat.completions.create(model=MODEL_ID, messages=messages, stop=[stop, "zzz"])
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL_ID, messages=messages, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected

    short = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert full.startswith(short.choices[0].message.content) and short.choices[0].message.content != full

    # The chat prompt as raw text: /v1/completions continues it with the same reply.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(yaml.safe_load(served.cfg.read_text())["model"]["name_or_path"])
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    comp = client.completions.create(model=MODEL_ID, prompt=text)
    assert comp.object == "text_completion"
    assert comp.choices[0].text.strip() == full and comp.choices[0].finish_reason == "stop"
    two = client.completions.create(model=MODEL_ID, prompt=[text, "What"], max_tokens=3)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == comp.choices[0].text[: len(two.choices[0].text)]
    assert two.usage.completion_tokens <= 6 and all(
        c.finish_reason in ("stop", "length") for c in two.choices
    )


@pytest.mark.slow
@pytest.mark.multiproc
def test_eight_concurrent_requests_are_batched_and_each_gets_its_own_answer(served: Served) -> None:
    client = served.client()
    # Different prompts and different lengths: an answer handed to the wrong request would show.
    asks = [(f"What is {i} + {2 * i}?", 1 + i) for i in range(8)]

    def ask(prompt: str, max_tokens: int) -> str:
        r = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
        )
        return r.choices[0].message.content

    alone = [ask(p, n) for p, n in asks]
    assert len(set(alone)) >= 6, alone  # (a token that is a space adds nothing to a trimmed reply)
    before = served.log.read_text().count("\n")
    answers: list[str | None] = [None] * 8
    start = threading.Barrier(8)

    def work(i: int) -> None:
        start.wait()
        answers[i] = ask(*asks[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == alone
    lines = served.log.read_text().splitlines()[before:]
    batches = [int(x.rsplit("batch=", 1)[1]) for x in lines if "POST /v1/chat/completions 200" in x]
    assert len(batches) == 8 and max(batches) > 1, lines  # decoded together, not one by one


def _hi(**extra: Any) -> bytes:
    """A valid chat request with `extra` fields on top."""
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **extra}).encode()


BAD_BODIES = [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"model": MODEL_ID}).encode(), "messages"),
    (json.dumps({"messages": "hi"}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "messages[0].content"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), "messages[0].role"),
    (_hi(max_tokens="9"), "max_tokens"),
    (_hi(max_tokens=10**6), "max_tokens"),  # over --max-tokens-limit
    (_hi(temperature=-1), "temperature"),
    (_hi(n=2), "n"),
    (_hi(stop=[1]), "stop"),
    (_hi(response_format={"type": "json_object"}), "response_format"),
]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_malformed_requests_get_a_400_in_the_openai_error_shape(
    served: Served, body: bytes, param: str | None
) -> None:
    status, reply = served.raw("POST", "/v1/chat/completions", body)
    assert status == 400, reply
    assert set(reply) == {"error"}
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"] and "Traceback" not in err["message"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_errors_through_the_openai_client(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "word " * 200}])
    assert bad.value.status_code == 400
    assert bad.value.body["code"] == "context_length_exceeded"  # data.max_length: 96 tokens
    with pytest.raises(openai.BadRequestError) as overflow:  # the tiny model's context: 256 tokens
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=250
        )
    assert overflow.value.body["code"] == "context_length_exceeded"
    assert overflow.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as wrong:
        served.client(key="not-the-key").models.list()
    assert wrong.value.status_code == 401
    status, reply = served.raw("POST", "/v1/chat/completions", b'{"messages": []}', key=None)
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    status, reply = served.raw("GET", "/v1/nothing")
    assert status == 404 and reply["error"]["type"] == "invalid_request_error"
    status, reply = served.raw("GET", "/v1/chat/completions")
    assert status == 405
    assert served.proc.poll() is None  # still serving
    assert "Traceback" not in served.log.read_text()
