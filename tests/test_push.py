"""`tunepipe push`: the export and its card to a Hub repo through huggingface_hub's real client.

No real Hub endpoint can be reached from where these tests run (no network, and no account to
write to), so the upload goes to a LOCAL STAND-IN for the Hub: a small HTTP server on 127.0.0.1,
started by the test, answering only the endpoints huggingface_hub's `create_repo` and
`create_commit` call (POST /api/repos/create, /api/validate-yaml, /api/models/{repo}/preupload/
{rev} — every file "regular", so no LFS — and /api/models/{repo}/commit/{rev}, whose NDJSON body
carries the files base64-encoded), reached through HF_ENDPOINT. Everything on the client side is
the real code path of `tunepipe push`.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import tunepipe, write_config

CANARY = "hf_" + "Pu5hT0kenCanary" * 2  # a token the stand-in accepts; it must appear nowhere else
REPO = "tester/tiny-dpo"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HubStandIn:
    """The few Hub endpoints of create_repo + create_commit, recording every request."""

    refuse_token: bool = False
    requests: list[Request] = field(default_factory=list)
    created: list[dict] = field(default_factory=list)
    committed: dict[str, bytes] = field(default_factory=dict)
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, obj: object) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                hub.requests.append(Request("GET", self.path, dict(self.headers), b""))
                if self.path.startswith("/api/agent-harnesses"):  # huggingface_hub's agent detection
                    return self._send(200, {"standardEnvVars": [], "harnesses": {}})
                self._send(404, {"error": "Repository not found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(Request("POST", self.path, dict(self.headers), body))
                path = self.path.split("?")[0]
                if hub.refuse_token:
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    repo = f"{payload.get('organization') or 'tester'}/{payload['name']}"
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/main", path)
                if m and m[2] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                    return self._send(200, {"files": modes})
                if m:
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            assert value["encoding"] == "base64"
                            hub.committed[value["path"]] = base64.b64decode(value["content"])
                    oid = "0" * 40
                    return self._send(200, {"commitUrl": f"{hub.url}/{m[1]}/commit/{oid}", "commitOid": oid})
                self._send(404, {"error": f"not served by the stand-in: {path}"})

        return Handler


@pytest.fixture
def hub() -> Iterator[HubStandIn]:
    stand_in = HubStandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), stand_in.handler())
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield stand_in
    server.shutdown()
    server.server_close()


def _env(home: Path, **extra: str) -> dict[str, str]:
    """No token from this machine's login: huggingface_hub's home is a fresh folder."""
    return {"HF_HOME": str(home), "HF_TOKEN": "", **extra}


@pytest.fixture
def trained(smoke_run: tuple[Path, Path]) -> tuple[Path, Path]:
    return smoke_run  # conftest's shared smoke run (tiny Qwen3, SFT then DPO)


def _listed(stdout: str) -> dict[str, int]:
    """The files a push printed: `  PATH  N bytes` lines."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^  (\S+)  (\d+) bytes$", stdout, re.M)}


@pytest.mark.slow
def test_dry_run_lists_the_export_and_its_card_without_a_token(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, run_dir = trained
    res = tunepipe("push", cfg, "--smoke", "--repo", REPO, "--dry-run", env=_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    listed = _listed(res.stdout)
    export = run_dir / "export-dpo"
    on_disk = {
        p.relative_to(export).as_posix(): p.stat().st_size
        for p in export.rglob("*")
        if p.is_file() and p.name != "tunepipe-export.json"
    }
    assert listed == on_disk
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(listed)
    assert f"dry run: would upload {len(listed)} files" in res.stdout and REPO in res.stdout
    assert "nothing uploaded" in res.stdout


@pytest.mark.slow
def test_push_uploads_exactly_the_dry_run_files_to_the_hub_stand_in(
    trained: tuple[Path, Path], tmp_path: Path, hub: HubStandIn
) -> None:
    cfg, run_dir = trained
    env = _env(tmp_path / "hf", HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN=CANARY)
    dry = tunepipe("push", cfg, "--smoke", "--repo", REPO, "--private", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert not hub.requests  # a dry run sends nothing
    res = tunepipe("push", cfg, "--smoke", "--repo", REPO, "--private", env=env)
    assert res.returncode == 0, res.stderr[-3000:]

    assert hub.created == [
        {"name": "tiny-dpo", "organization": "tester", "visibility": "private", "type": "model"}
    ]
    export = run_dir / "export-dpo"
    assert set(hub.committed) == set(_listed(dry.stdout)) == set(_listed(res.stdout))
    for path, data in hub.committed.items():
        assert data == (export / path).read_bytes(), path
    card = hub.committed["README.md"].decode()
    assert "| set | metric | base | sft | dpo |" in card and f'model_id = "{REPO}"' in card
    assert f"commit: {hub.url}/{REPO}/commit/" in res.stdout

    # The token travels only in the Authorization header of the Hub calls.
    posts = [r for r in hub.requests if r.method == "POST"]
    assert posts and all(r.headers.get("authorization") == f"Bearer {CANARY}" for r in posts)
    assert all(CANARY.encode() not in r.body for r in hub.requests)
    assert CANARY not in res.stdout + res.stderr + dry.stdout + dry.stderr
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert CANARY.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_a_refused_token_exits_2_with_the_login_hint(
    trained: tuple[Path, Path], tmp_path: Path, hub: HubStandIn
) -> None:
    cfg, _ = trained
    hub.refuse_token = True
    env = _env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN=CANARY)
    res = tunepipe("push", cfg, "--smoke", "--repo", REPO, env=env)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "refused the token (HTTP 401)" in res.stderr and "hf auth login" in res.stderr
    assert "Traceback" not in res.stderr and CANARY not in res.stdout + res.stderr
    assert not hub.committed


@pytest.mark.slow
def test_an_unreachable_hub_exits_1_without_a_traceback(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_OFFLINE="0", HF_TOKEN=CANARY)
    res = tunepipe("push", trained[0], "--smoke", "--repo", REPO, env=env)
    assert res.returncode == 1
    assert f"cannot reach http://127.0.0.1:{port}" in res.stderr and "Traceback" not in res.stderr


# --------------------------------------------------------------------------- fast: bad input, exit 2


@pytest.fixture
def untrained(tmp_path: Path, tiny_qwen3: Path) -> Path:
    return write_config(tmp_path, tiny_qwen3)


def test_missing_token_exits_2_before_any_export(untrained: Path, tmp_path: Path) -> None:
    # A finished stage is needed before the token check: fake the stage's record, not its weights.
    stage = tmp_path / "runs" / "test" / "dpo" / "stage.json"
    stage.parent.mkdir(parents=True)
    stage.write_text(json.dumps({"stage": "dpo", "status": "done"}))
    res = tunepipe("push", untrained, "--repo", REPO, env=_env(tmp_path / "hf", HF_HUB_OFFLINE="0"))
    assert res.returncode == 2
    assert "set HF_TOKEN or run `hf auth login`" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "test" / "export-dpo").exists()


def test_a_stage_not_trained_exits_2_naming_it_and_the_command(untrained: Path, tmp_path: Path) -> None:
    res = tunepipe("push", untrained, "--repo", REPO, "--stage", "sft", "--dry-run", env=_env(tmp_path))
    assert res.returncode == 2
    assert "stage sft has not run" in res.stderr and f"tunepipe run {untrained}`" in res.stderr
    run = tmp_path / "runs" / "test"
    run.mkdir(parents=True)
    (run / "pipeline.json").write_text(json.dumps({"stages": {"dpo": {"status": "stale"}}}))
    res = tunepipe("push", untrained, "--repo", REPO, "--dry-run", env=_env(tmp_path))
    assert res.returncode == 2 and "stage dpo is stale" in res.stderr
    res = tunepipe("push", untrained, "--repo", REPO, "--stage", "kto", "--dry-run", env=_env(tmp_path))
    assert res.returncode == 2 and "--stage kto: not a trained stage" in res.stderr


def test_bad_repo_and_format_exit_2(untrained: Path, tmp_path: Path) -> None:
    res = tunepipe("push", untrained, "--repo", "not a repo//x", "--dry-run", env=_env(tmp_path))
    assert res.returncode == 2 and "--repo 'not a repo//x': not a Hub repo id" in res.stderr
    res = tunepipe("push", untrained, "--repo", REPO, "--format", "onnx", "--dry-run", env=_env(tmp_path))
    assert res.returncode == 2 and "--format onnx" in res.stderr
    res = tunepipe("push", untrained, "--dry-run", env=_env(tmp_path))
    assert res.returncode == 2 and "--repo is required" in res.stderr
