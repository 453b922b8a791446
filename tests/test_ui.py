"""`tunepipe ui`'s server without a browser: the real HTTP server on 127.0.0.1 (in a thread), real
requests. Token on a non-loopback bind, path traversal, cross-site and DNS-rebinding refusals, secrets
kept out of every response, the start form's validation by field, and the run-folder readers."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import write_config, write_jsonl

from tunepipe.ui import runs
from tunepipe.ui.server import App, key_lines, make_server, parse_command

CANARY_ENV = "Zq7canaryEnvSecretValue9913"  # a secret-named variable's value: no pattern to match it
CANARY_HF = "hf_CANARYabcdefghijklmnopqrstuv"  # looks like a Hugging Face token


def fake_run(root: Path, name: str = "demo") -> Path:
    """A run folder as the CLI leaves it (written by hand: no training), secrets planted in every
    file a page or the API reads."""
    d = root / name
    (d / "sft").mkdir(parents=True)
    (d / "logs").mkdir()
    (d / "data").mkdir()
    (d / "eval" / "samples").mkdir(parents=True)
    (d / "report").mkdir()
    cfg = {
        "project": {"name": name, "goal": f"ship it {CANARY_HF} and {CANARY_ENV}", "output_dir": "runs/demo"},
        "hardware": {"time_limit": "2h"},
        "pipeline": ["sft"],
        "sft": {"enabled": True},
    }
    (d / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    state = {
        "stages": {
            "data": {
                "status": "done",
                "seconds": 2.0,
                "gates": [{"name": "data_loads", "passed": True, "detail": "ok"}],
            },
            "sft": {"status": "stopped", "seconds": 30.0, "error": f"stopped by signal ({CANARY_ENV})"},
        },
        "command": {"argv": ["run", "tunepipe.yaml"], "cwd": str(root.parent), "resumable": True},
        "updated_at": "2026-12-01T10:00:00",
    }
    (d / "pipeline.json").write_text(json.dumps(state))
    write_jsonl(
        d / "sft" / "log.jsonl",
        [
            {"step": i, "loss": 2.0 - i / 10, "learning_rate": 1e-4, "elapsed_s": i * 1.0, "max_steps": 10}
            for i in (1, 2, 3)
        ],
    )
    (d / "logs" / "sft.log").write_text(f"[sft] running\nwarning: token {CANARY_HF} in a log line\n")
    (d / "data" / "stats.json").write_text(json.dumps({"sources": [], "splits": {}}))
    write_jsonl(d / "data" / "rejects.jsonl", [{"file": "x.jsonl", "line": 3, "reason": f"bad {CANARY_ENV}"}])
    (d / "eval" / "metrics.json").write_text(
        json.dumps({"base": {"s": {"exact_match": 0.2, "n": 5}}, "sft": {"s": {"exact_match": 0.6, "n": 5}}})
    )
    write_jsonl(
        d / "eval" / "samples" / "base.s.jsonl",
        [{"prompt": f"p {CANARY_HF}", "reference": "r", "output": "o", "score": {"exact_match": 0}}],
    )
    write_jsonl(
        d / "eval" / "samples" / "sft.s.jsonl",
        [{"prompt": "p", "reference": "r", "output": f"o {CANARY_ENV}", "score": {"exact_match": 1}}],
    )
    (d / "report" / "report.html").write_text(f"<html><body>report {CANARY_HF} {CANARY_ENV}</body></html>")
    return d


@pytest.fixture
def canary_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", CANARY_ENV)


@contextlib.contextmanager
def serve(
    root: Path, project: Path, host: str = "127.0.0.1", token: str | None = None
) -> Iterator[tuple[int, App]]:
    server, app = make_server(root, project, host=host, port=0, token=token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], app
    finally:
        server.shutdown()
        server.server_close()


def request(
    port: int,
    method: str,
    path: str,
    body: dict | None = None,
    headers: dict[str, str] | None = None,
    read: bool = True,
) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
    hdrs = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    if resp.getheader("Content-Type", "").startswith("text/event-stream"):
        payload = resp.read1(65536) if read else b""  # a stream never ends: its first chunk
    else:
        payload = resp.read()
    conn.close()
    return resp.status, payload, dict(resp.getheaders())


UI = {"X-Tunepipe-UI": "1"}


# --------------------------------------------------------------------------- security


ENDPOINTS = [
    ("GET", "/", None),
    ("GET", "/static/app.js", None),
    ("GET", "/api/runs", None),
    ("GET", "/api/configs", None),
    ("GET", "/api/runs/demo", None),
    ("GET", "/api/runs/demo/log?stage=sft", None),
    ("GET", "/api/runs/demo/events", None),
    ("GET", "/runs/demo/report/report.html", None),
    ("GET", "/no/such/page", None),
    ("POST", "/api/validate", {"config": "tunepipe.yaml"}),
    ("POST", "/api/start", {"config": "tunepipe.yaml"}),
    ("POST", "/api/runs/demo/stop", {}),
    ("POST", "/api/runs/demo/resume", {}),
    ("POST", "/api/runs/demo/chat", {"stage": "sft", "prompt": "hi"}),
    ("PUT", "/api/runs", {}),
]


def test_non_loopback_bind_needs_the_token_on_every_endpoint(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    fake_run(root)
    with serve(root, tmp_path, host="0.0.0.0") as (port, app):
        assert app.token and len(app.token) >= 24  # generated: a non-loopback bind never runs open
        for method, path, body in ENDPOINTS:
            status, payload, _ = request(port, method, path, body, UI)
            assert status == 401, (method, path, status)
            assert b"token" in payload
            bad = {**UI, "Authorization": "Bearer wrong-token"}
            assert request(port, method, path, body, bad)[0] == 401, (method, path)
        good = {**UI, "Authorization": f"Bearer {app.token}"}
        assert request(port, "GET", "/api/runs", None, good)[0] == 200
        assert request(port, "GET", "/", None, good)[0] == 200
        # ?token= once: the token moves into an HttpOnly cookie and the address drops it.
        status, _, headers = request(port, "GET", f"/?token={app.token}")
        assert status == 303 and headers["Location"] == "./"
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert request(port, "GET", "/api/runs/demo", None, {"Cookie": cookie})[0] == 200


def test_cli_prints_a_generated_token_for_a_non_loopback_host(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunepipe", "ui", str(tmp_path / "runs"), "--host", "0.0.0.0", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "?token=" in line, line
        token = line.split("?token=")[1].split()[0]
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert request(port, "GET", "/api/runs")[0] == 401
        assert request(port, "GET", "/api/runs", None, {"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_path_traversal_and_foreign_files_answer_404(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    d = fake_run(root)
    secret = tmp_path / "outside.txt"
    secret.write_text("outside the runs folder")
    (d / "link.txt").symlink_to(secret)  # a link out of the runs folder is not followed
    with serve(root, tmp_path) as (port, _app):
        assert request(port, "GET", "/runs/demo/report/report.html")[0] == 200
        for path in [
            "/runs/demo/../../outside.txt",
            "/runs/demo/%2e%2e/%2e%2e/outside.txt",
            "/runs/demo/..%2f..%2foutside.txt",
            "/runs/..%2foutside.txt/x",
            f"/runs/demo/{secret}",
            f"/runs/demo/%2F{str(secret).lstrip('/')}",
            "/runs/demo/link.txt",
            "/runs/.tunepipe-ui/x.out",
            "/runs/demo/no-such-file",
            "/static/../server.py",
            "/static/%2e%2e%2fserver.py",
            "/api/runs/..",
            "/api/runs/%2e%2e%2fdemo",
        ]:
            status, payload, _ = request(port, "GET", path)
            assert status == 404, (path, status)
            assert b"outside the runs folder" not in payload


def test_cross_site_and_rebinding_requests_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    fake_run(root)
    with serve(root, tmp_path) as (port, _app):
        # A page of another site can post a form, but not with the page's own header.
        status, _, _ = request(port, "POST", "/api/runs/demo/stop", {})
        assert status == 403
        status, _, _ = request(
            port, "POST", "/api/runs/demo/stop", {}, {**UI, "Origin": "http://evil.example"}
        )
        assert status == 403
        status, _, _ = request(
            port, "POST", "/api/runs/demo/stop", {}, {**UI, "Sec-Fetch-Site": "cross-site"}
        )
        assert status == 403
        # A name that resolves to 127.0.0.1 (DNS rebinding) is refused on a loopback bind.
        assert request(port, "GET", "/api/runs", None, {"Host": "evil.example"})[0] == 403
        # Same origin: the request reaches the app (nothing runs there: 409, not a refusal).
        status, payload, _ = request(
            port, "POST", "/api/runs/demo/stop", {}, {**UI, "Origin": f"http://127.0.0.1:{port}"}
        )
        assert status == 409 and b"not running" in payload


def test_no_secret_in_any_page_or_api_response(tmp_path: Path, canary_env: None) -> None:
    root = tmp_path / "runs"
    fake_run(root)
    project = tmp_path
    # A config in the project folder with both canaries in it, for the start form.
    (project / "tunepipe.yaml").write_text(
        yaml.safe_dump(
            {"project": {"name": "x", "goal": f"{CANARY_HF} {CANARY_ENV}", "output_dir": "runs/x"}}
        )
    )
    (root / ".tunepipe-ui").mkdir()
    (root / ".tunepipe-ui" / "demo.out").write_text(f"$ tunepipe run\n{CANARY_ENV}\n")
    with serve(root, project) as (port, _app):
        seen = []
        for method, path, body in [
            *ENDPOINTS,
            ("GET", "/static/app.css", None),
            ("GET", "/static/index.html", None),
            ("GET", "/runs/demo/config.resolved.yaml", None),
            ("GET", "/runs/demo/logs/sft.log", None),
            ("GET", "/runs/demo/data/rejects.jsonl", None),
            ("GET", "/runs/demo/pipeline.json", None),
            (
                "POST",
                "/api/validate",
                {"config": "tunepipe.yaml", "overrides": [f"project.goal={CANARY_ENV}"]},
            ),
        ]:
            status, payload, _ = request(port, method, path, body, UI)
            seen.append((path, status))
            assert CANARY_ENV.encode() not in payload, path
            assert CANARY_HF.encode() not in payload, path
        detail = json.loads(request(port, "GET", "/api/runs/demo")[1])
        assert "***" in detail["config"] and detail["output"]  # what held a secret is still shown
        assert dict(seen)["/api/runs/demo"] == 200 and dict(seen)["/runs/demo/logs/sft.log"] == 200


# --------------------------------------------------------------------------- the start form


def test_validation_names_each_field(tmp_path: Path, tiny_qwen3: Path) -> None:
    cfg_path = write_config(tmp_path, tiny_qwen3)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["sft"]["learning_rate"] = -1.0
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    line = key_lines(cfg_path.read_text())["sft.learning_rate"]
    app = App(tmp_path / "runs", tmp_path, None, True)

    res = app.validate({"config": "tunepipe.yaml"})
    assert not res["ok"]
    [err] = res["errors"]
    assert err["field"] == "key" and err["key"] == "sft.learning_rate" and err["line"] == line
    assert "greater than 0" in err["message"]

    # The same key set right by an override: valid; a misspelt override is named by its index.
    res = app.validate({"config": "tunepipe.yaml", "overrides": ["sft.learning_rate=1e-3", "dpo.bta=0.1"]})
    [err] = res["errors"]
    assert err["field"] == "override" and err["index"] == 1 and "did you mean 'dpo.beta'" in err["message"]
    res = app.validate({"config": "tunepipe.yaml", "overrides": ["sft.learning_rate=1e-3", "nonsense"]})
    assert res["errors"][0]["field"] == "override" and res["errors"][0]["index"] == 1

    ok = app.validate({"config": "tunepipe.yaml", "overrides": ["sft.learning_rate=1e-3"], "smoke": True})
    assert ok["ok"] and ok["run"] == "test-smoke"
    assert ok["argv"] == ["run", "tunepipe.yaml", "--smoke", "sft.learning_rate=1e-3"]

    # Outside the project folder, missing, or a run folder the dashboard would not show.
    assert app.validate({"config": "../x.yaml"})["errors"][0]["field"] == "config"
    assert app.validate({"config": "nope.yaml"})["errors"][0]["field"] == "config"
    res = app.validate(
        {
            "config": "tunepipe.yaml",
            "overrides": ["sft.learning_rate=1e-3", "project.output_dir=/tmp/elsewhere"],
        }
    )
    assert (
        res["errors"][0]["key"] == "project.output_dir"
        and "outside the dashboard's runs folder" in res["errors"][0]["message"]
    )
    assert app.configs() == ["tunepipe.yaml"]


def test_parse_command_reads_config_overrides_and_smoke() -> None:
    argv = ["run", "cfg.yaml", "--smoke", "--from", "sft", "sft.max_steps=3", "--node-rank", "0", "x.y=1"]
    assert parse_command(argv) == ("cfg.yaml", ["sft.max_steps=3", "x.y=1"], True)
    assert parse_command(["train", "c.yaml", "--stage", "dpo"]) == ("c.yaml", [], False)


# --------------------------------------------------------------------------- run-folder readers


def test_run_summary_status_eta_and_best(tmp_path: Path) -> None:
    d = fake_run(tmp_path / "runs")
    s = runs.summary(d)
    assert s["status"] == "stopped" and s["stage"] == "sft"
    assert s["used_s"] == 32.0 and s["budget_s"] == 7200
    assert s["best"] == {"metric": "exact_match", "set": "s", "model": "sft", "value": 0.6}
    rows, offset = runs.read_rows(d / "sft" / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert runs.eta(rows) == {"step": 3, "max_steps": 10, "seconds_left": 7.0}
    # A line being written is not read until it is whole.
    with (d / "sft" / "log.jsonl").open("a") as fh:
        fh.write('{"step": 4, "lo')
    more, offset2 = runs.read_rows(d / "sft" / "log.jsonl", offset)
    assert more == [] and offset2 == offset
    # A stage recorded as running with no live process holding the folder: interrupted.
    state = json.loads((d / "pipeline.json").read_text())
    state["stages"]["sft"]["status"] = "running"
    state["stages"]["sft"]["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (d / "pipeline.json").write_text(json.dumps(state))
    assert runs.summary(d)["status"] == "interrupted"
    # A process holding the folder's lock (flock) with its PID in the lock file: running. The same
    # PID written without the lock held (a finished run's file, a reused PID): not running.
    import fcntl

    lock = d / ".tunepipe.lock"
    lock.write_text(json.dumps({"pid": os.getpid()}))
    with lock.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert runs.summary(d)["status"] == "running"
        assert runs.summary(d)["used_s"] >= 2.0  # the running stage's time so far counts
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    assert runs.summary(d)["status"] == "interrupted"
    assert runs.summary(d)["used_s"] == 32.0  # what was recorded; an interrupted clock does not run on
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "another-machine"}))
    assert runs.holder(d) is None


def test_keep_alive_cookies_config_files_and_metric_names(tmp_path: Path, canary_env: None) -> None:
    root = tmp_path / "runs"
    d = fake_run(root)
    with (d / "sft" / "log.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 4, "loss": 1.5, "mean_token_accuracy": 0.25}) + "\n")
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={CANARY_ENV}\n")
    (tmp_path / "secrets.yaml").write_text(
        "project:\n  name: x\nwandb:\n  api_key: 0123456789abcdef0123456789abcdef01234567\n"
    )
    with serve(root, tmp_path, token="tok-123456789") as (port, _app):
        # A POST whose body the route never reads leaves nothing behind on the keep-alive connection.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
        hdrs = {**UI, "Authorization": "Bearer tok-123456789", "Content-Type": "application/json"}
        conn.request("POST", "/api/runs/demo/stop", body=b"{}", headers=hdrs)
        assert conn.getresponse().read() and True
        conn.request("GET", "/api/runs", headers=hdrs)
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read())["runs"][0]["name"] == "demo"
        conn.close()
        # Another app's unparsable cookie on the same host does not hide the dashboard's.
        cookie = 'other="x; a=b c; tunepipe_ui_token=tok-123456789'
        assert request(port, "GET", "/api/runs", None, {"Cookie": cookie})[0] == 200
        auth = {**UI, "Authorization": "Bearer tok-123456789"}
        # Only YAML configs, and secret-named keys masked in what the form shows.
        res = json.loads(request(port, "POST", "/api/validate", {"config": ".env"}, auth)[1])
        assert res["errors"][0]["field"] == "config" and CANARY_ENV not in json.dumps(res)
        res = json.loads(request(port, "POST", "/api/validate", {"config": "secrets.yaml"}, auth)[1])
        assert "0123456789abcdef" not in res["yaml"] and "api_key: ***" in res["yaml"]
        # Metric names are not secrets: mean_token_accuracy reaches the page.
        rows = json.loads(request(port, "GET", "/api/runs/demo/log?stage=sft", None, auth)[1])["rows"]
        assert rows[-1]["mean_token_accuracy"] == 0.25
        # A new stream (a reconnect) starts with reset: the page replaces, never doubles, its points.
        frames = request(port, "GET", "/api/runs/demo/events", None, auth)[1].decode()
        logs = [json.loads(x[6:]) for x in frames.splitlines() if x.startswith("data: ") and '"rows"' in x]
        assert all(f["reset"] for f in logs)


def test_a_nan_loss_reaches_the_page_as_null_not_as_invalid_json(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    d = fake_run(root)
    with (d / "sft" / "log.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 4, "loss": float("nan"), "grad_norm": float("inf")}) + "\n")

    def strict(text: bytes) -> object:  # a browser's JSON.parse: no NaN / Infinity
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a response"))

    with serve(root, tmp_path) as (port, _app):
        rows = strict(request(port, "GET", "/api/runs/demo/log?stage=sft")[1])["rows"]  # type: ignore[index]
        assert rows[-1]["loss"] is None and rows[-1]["grad_norm"] is None
        frame = request(port, "GET", "/api/runs/demo/events")[1].decode()
        for line in frame.splitlines():
            if line.startswith("data: "):
                strict(line[6:].encode())
