"""`tunepipe ui`: a local web dashboard over a runs folder, on the standard library's HTTP server.

Why no web framework: the dashboard reads files the CLI writes and runs the CLI as a subprocess, so it
needs routing, JSON, static files and server-sent events only — ThreadingHTTPServer does all four
(one thread per connection, an SSE stream is a response that keeps writing). No Gradio or ASGI stack
to upgrade under the user, nothing loaded from a CDN: the page, its script and its charts (SVG) ship
in the package.

Security: binds 127.0.0.1 by default and then accepts only loopback Host headers (no DNS rebinding);
any other bind requires a token (generated and printed, or --token), checked on every request, as a
Bearer header, the `tunepipe_ui_token` cookie or `?token=` once. Requests that change anything (POST)
must also carry the `X-Tunepipe-UI` header and a same-origin Origin, which a cross-site page cannot
send. Only files under the runs folder are served; every response goes through redaction.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
import mimetypes
import re
import secrets
import shlex
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..redaction import redact_text
from . import runs
from .jobs import OUTPUT_DIR, Jobs

COOKIE = "tunepipe_ui_token"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
IMAGE_TYPES = {".png", ".svg", ".jpg", ".jpeg"}
MAX_FILE_BYTES = 50 << 20
TEXT_TYPES = {".html", ".htm", ".md", ".txt", ".log", ".json", ".jsonl", ".yaml", ".yml", ".csv", ".out"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
POLL_S = 0.5  # how often a live page's stream looks at the run folder
START_WAIT_S = 60.0  # a started command has this long to make its run folder before the page opens


class UIError(Exception):
    def __init__(self, status: int, message: str, fields: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.fields = status, fields or []


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name of a Host header: `127.0.0.1:8765` -> 127.0.0.1, `[::1]:80` -> ::1, `localhost`."""
    h = header.strip()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def key_lines(text: str) -> dict[str, int]:
    """{dotted key: 1-based line} of a YAML mapping, for errors shown next to their line."""
    import yaml

    out: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")

    with contextlib.suppress(yaml.YAMLError):
        walk(yaml.compose(text), "")
    return out


def parse_command(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """(config path, KEY=VALUE overrides, --smoke) of a recorded `tunepipe run|train|eval ...` command."""
    with_value = {"--from", "--stage", "--node-rank", "--master-addr", "--master-port"}
    config, overrides, smoke, skip = None, [], False, False
    for i, a in enumerate(argv[1:], 1):
        if skip:
            skip = False
            continue
        if a in with_value:
            skip = True
        elif a == "--smoke":
            smoke = True
        elif a.startswith("-"):
            continue
        elif "=" in a and config is not None:
            overrides.append(a)
        elif config is None and i >= 1:
            config = a
    return config, overrides, smoke


class App:
    """The dashboard's state: the runs folder, the project folder configs are read from, the jobs it
    started, the chat models it loaded."""

    def __init__(self, root: Path, project: Path, token: str | None, loopback: bool):
        self.root = root.resolve()
        self.project = project.resolve()
        self.token = token
        self.loopback = loopback
        self.jobs = Jobs(self.root)
        self._chat: dict[tuple[str, str], Any] = {}
        self._chat_lock = threading.Lock()

    # ------------------------------------------------------------------ runs

    def run_dir(self, name: str) -> Path:
        """A run folder by name: a direct child of the runs folder, else 404."""
        if not RUN_NAME.fullmatch(name) or name == OUTPUT_DIR:
            raise UIError(404, f"no run {name!r}")
        d = self.root / name
        if not runs.is_run_dir(d) or d.resolve().parent != self.root:
            raise UIError(404, f"no run {name!r} in {self.root}")
        return d

    def file_in_run(self, name: str, rel: str) -> Path:
        """A file under a run folder: no absolute paths, no `..`, no link out of the runs folder."""
        d = self.run_dir(name)
        parts = Path(rel).parts
        if not rel or "\0" in rel or Path(rel).is_absolute() or ".." in parts or rel.startswith("/"):
            raise UIError(404, "not found")
        p = (d / rel).resolve()
        if not p.is_relative_to(d.resolve()) or not p.is_file():
            raise UIError(404, "not found")
        return p

    # ------------------------------------------------------------------ configs

    def configs(self) -> list[str]:
        """YAML files of the project folder that look like tunepipe configs (for the start form)."""
        found: list[str] = []
        skip = {".git", ".venv", "venv", "node_modules", "__pycache__", ".tunepipe-ui"}

        def visit(d: Path, depth: int) -> None:
            if depth > 3 or len(found) >= 200:
                return
            try:
                entries = sorted(d.iterdir())
            except OSError:
                return
            for e in entries:
                if e.is_dir() and e.name not in skip and e.resolve() != self.root:
                    visit(e, depth + 1)
                elif e.suffix in (".yaml", ".yml") and e.is_file():
                    with contextlib.suppress(OSError):
                        head = e.read_text(encoding="utf-8", errors="replace")[:4000]
                        if re.search(r"^(project|pipeline|model|sft|dpo):", head, re.M):
                            found.append(str(e.relative_to(self.project)))

        visit(self.project, 0)
        return found

    def validate(self, body: dict[str, Any]) -> dict[str, Any]:
        """The start form checked with the same schema `tunepipe run` uses; each problem names its
        field (config, an override, or a dotted config key with its line in the file)."""
        from ..config import ConfigError, load_config, parse_override
        from ..pipeline import run_dir_for

        config = str(body.get("config") or "").strip()
        overrides = [str(o).strip() for o in body.get("overrides") or [] if str(o).strip()]
        smoke = bool(body.get("smoke"))
        errors: list[dict[str, Any]] = []
        text = ""
        path = (self.project / config).resolve() if config else None
        if path is None:
            errors.append({"field": "config", "message": "choose a config file"})
        elif not path.is_relative_to(self.project):
            errors.append(
                {
                    "field": "config",
                    "message": f"{config}: configs are read from the project folder {self.project}",
                }
            )
        elif path.suffix.lower() not in (".yaml", ".yml"):
            errors.append({"field": "config", "message": f"{config}: not a YAML config (.yaml, .yml)"})
        elif not path.is_file():
            errors.append({"field": "config", "message": f"{config}: no such file in {self.project}"})
        else:
            text = redact_yaml(path.read_text(encoding="utf-8", errors="replace"))
        for i, item in enumerate(overrides):
            try:
                parse_override(item)
            except ConfigError as e:
                errors.append({"field": "override", "index": i, "message": str(e)})
        result: dict[str, Any] = {"yaml": text, "errors": errors, "ok": False}
        if errors:
            return result
        assert path is not None
        lines = key_lines(text)
        override_keys = {o.split("=", 1)[0].strip(): i for i, o in enumerate(overrides)}
        try:
            cfg = load_config(path, overrides)
        except ConfigError as e:
            fields = e.fields or [{"key": "", "message": str(e)}]
            for f in fields:
                key = f["key"]
                err: dict[str, Any] = {"field": "key", "key": key, "message": f["message"]}
                hit = next((k for k in (key, *_parents(key)) if k in override_keys), None)
                if hit is not None:
                    err.update(field="override", index=override_keys[hit])
                else:
                    line = next((lines[k] for k in (key, *_parents(key)) if k in lines), None)
                    err["line"] = line
                errors.append(err)
            return result
        run_dir = run_dir_for(cfg, smoke).resolve()
        if run_dir.parent != self.root:
            errors.append(
                {
                    "field": "key",
                    "key": "project.output_dir",
                    "line": lines.get("project.output_dir"),
                    "message": f"this run would write {run_dir}, outside the dashboard's runs folder "
                    f"{self.root}; add the override project.output_dir={self.root / cfg.output_dir.name}",
                }
            )
            return result
        rel = str(path.relative_to(self.project))
        argv = ["run", rel, *(["--smoke"] if smoke else []), *overrides]
        return {
            **result,
            "ok": True,
            "run": run_dir.name,
            "argv": argv,
            "command": "tunepipe " + shlex.join(argv),
            "pipeline": list(cfg.pipeline),
        }

    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        checked = self.validate(body)
        if not checked["ok"]:
            raise UIError(400, "the config has problems", checked["errors"])
        try:
            job = self.jobs.start(checked["run"], checked["argv"], self.project)
        except RuntimeError as e:
            raise UIError(409, str(e)) from None
        self._wait_started(checked["run"], job)
        return {"run": checked["run"], "job": job.state()}

    def _wait_started(self, name: str, job: Any, timeout: float = START_WAIT_S) -> None:
        """Until the command has made its run folder, or ended without one (a preflight problem:
        its output is the error)."""
        end = time.time() + timeout
        while time.time() < end and not runs.is_run_dir(self.root / name):
            if job.proc.poll() is not None:
                if runs.is_run_dir(self.root / name):
                    return
                raise UIError(
                    400, f"the run ended at once (exit {job.proc.returncode}):\n{self.jobs.output(name)}"
                )
            time.sleep(0.1)

    def resume(self, name: str) -> dict[str, Any]:
        d = self.run_dir(name)
        command = runs._json(d / "pipeline.json").get("command") or {}
        argv, cwd = command.get("argv"), command.get("cwd")
        if not argv or not cwd or not command.get("resumable"):
            raise UIError(409, f"{name}: no command recorded that can be run again; run it from a terminal")
        if not Path(cwd).is_dir():
            raise UIError(409, f"{name}: the folder it was started from is gone ({cwd})")
        try:
            job = self.jobs.start(name, list(argv), Path(cwd))
        except RuntimeError as e:
            raise UIError(409, str(e)) from None
        return {"run": name, "job": job.state()}

    def stop(self, name: str) -> dict[str, Any]:
        self.run_dir(name)
        try:
            pid = self.jobs.stop(name)
        except LookupError as e:
            raise UIError(409, str(e)) from None
        return {"run": name, "signal": "SIGTERM", "pid": pid}

    # ------------------------------------------------------------------ chat

    def chat_model(self, name: str, stage: str) -> Any:
        """The run's model at `stage`, loaded the way `tunepipe chat CONFIG --stage` loads it (the
        config and overrides of the run's recorded command); one model kept in memory."""
        from ..chat import load_from_config
        from ..pipeline import run_dir_for

        d = self.run_dir(name)
        key = (name, stage)
        if key in self._chat:
            return self._chat[key]
        command = runs._json(d / "pipeline.json").get("command") or {}
        config, overrides, smoke = parse_command(list(command.get("argv") or []))
        if not config or not command.get("cwd"):
            raise UIError(409, f"{name}: no recorded command to find its config; use `tunepipe chat`")
        path = Path(command["cwd"]) / config
        from ..config import load_config

        cfg = load_config(path, overrides)
        if run_dir_for(cfg, smoke).resolve() != d.resolve():
            raise UIError(409, f"{path} now writes another run folder; use `tunepipe chat`")
        self._chat.clear()  # one model at a time: a laptop's memory
        model = load_from_config(path, overrides, stage, smoke, log=lambda _m: None)
        self._chat[key] = model
        return model


def _finite(obj: Any) -> Any:
    """NaN and inf (a diverged loss) as null: JSON has no such numbers and a browser's JSON.parse
    rejects Python's NaN. Tuples become lists and paths strings, so that redaction sees them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def redact_values(obj: Any) -> Any:
    """Credentials in every string of a response. By value, not by key name: the API's keys are
    tunepipe's own (metric names such as `mean_token_accuracy` are not secrets); configs, where a key
    names a secret, are redacted by key as YAML (`redact_yaml`) or were when written."""
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_values(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_yaml(text: str) -> str:
    """A YAML file as text with the values of secret-named keys masked (`api_key: ***`) and
    credentials anywhere else, keeping its lines where they were (errors point at them)."""
    import yaml

    from ..redaction import MASK, is_secret_name

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return redact_text(text)
    spans: list[tuple[int, int]] = []

    def walk(node: Any) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if is_secret_name(str(k.value)) and isinstance(v, yaml.ScalarNode) and v.value:
                    spans.append((v.start_mark.index, v.end_mark.index))
                else:
                    walk(v)
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                walk(v)

    walk(root)
    for a, b in sorted(spans, reverse=True):
        text = text[:a] + MASK + text[b:]
    return redact_text(text)


def to_json(obj: Any) -> str:
    """What every response and event carries: redacted, finite, JSON."""
    return json.dumps(redact_values(_finite(obj)), default=str, allow_nan=False)


def _tail(path: Path, offset: int, n: int = 64) -> bytes:
    """The `n` bytes of `path` before `offset` (what a rewritten file no longer has there)."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, offset - n))
            return fh.read(min(offset, n))
    except OSError:
        return b""


def _without_token(url: Any) -> str:
    """Where the ?token= redirect goes: the same page (relative, for a proxy's path prefix) and
    query without the token."""
    from urllib.parse import urlencode

    rest = [(k, v) for k, vs in parse_qs(url.query).items() if k != "token" for v in vs]
    page = url.path.rsplit("/", 1)[-1] or "./"
    return page + (f"?{urlencode(rest)}" if rest else "")


def _parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


class Handler(BaseHTTPRequestHandler):
    server_version = "tunepipe-ui"
    protocol_version = "HTTP/1.1"
    app: App  # set on the subclass made by `make_server`

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return  # quiet: a live page polls; errors are printed where they happen

    # ------------------------------------------------------------------ plumbing

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "SAMEORIGIN")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        body = to_json(obj).encode()
        self._send(status, body, "application/json; charset=utf-8")

    def _error(self, status: int, message: str, fields: list[dict[str, Any]] | None = None) -> None:
        self._json({"error": redact_text(message), "fields": fields or []}, status)

    def _token_given(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:].strip()
        # By hand: SimpleCookie drops every cookie after one it cannot parse (another app's, same host).
        for part in self.headers.get("Cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == COOKIE:
                return v.strip('"')
        q = parse_qs(urlsplit(self.path).query).get("token")
        return q[0] if q else None

    def _authorized(self) -> bool:
        app = self.app
        if app.loopback:
            host = host_name(self.headers.get("Host") or "")
            if not is_loopback(host):  # another name resolving to 127.0.0.1: DNS rebinding
                self._error(403, f"Host {host!r} refused: the dashboard answers on 127.0.0.1 / localhost")
                return False
        if app.token is None:
            return True
        given = self._token_given()
        if given is None or not hmac.compare_digest(given.encode(), app.token.encode()):
            self._error(401, "a token is needed: open the URL `tunepipe ui` printed (it ends in ?token=...)")
            return False
        return True

    def _same_origin(self) -> bool:
        """State-changing requests: the page's own header, and no foreign Origin or fetch site."""
        if self.headers.get("X-Tunepipe-UI") != "1":
            self._error(403, "cross-site request refused (X-Tunepipe-UI header missing)")
            return False
        origin = self.headers.get("Origin")
        host = self.headers.get("Host")
        if origin and urlsplit(origin).netloc != host:
            self._error(403, f"cross-site request refused (Origin {origin})")
            return False
        if self.headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
            self._error(403, "cross-site request refused")
            return False
        return True

    def _read_body(self) -> bool:
        """Read the request body first, whatever the answer: bytes left unread would be taken for the
        next request on this keep-alive connection."""
        self._raw = b""
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if n < 0 or n > 1_000_000:
            self.close_connection = True
            self._error(400 if n < 0 else 413, "bad Content-Length" if n < 0 else "request too large")
            return False
        self._raw = self.rfile.read(n) if n else b""
        return True

    def _body(self) -> dict[str, Any]:
        raw = self._raw or b"{}"
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise UIError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise UIError(400, "the request body must be a JSON object")
        return body

    def _dispatch(self, method: str) -> None:
        self._streaming = False
        try:
            if not self._read_body() or not self._authorized():
                return
            url = urlsplit(self.path)
            if method == "GET" and "token" in parse_qs(url.query) and self.app.token:
                # The token moves into a cookie; the address bar drops it.
                self._send(
                    303,
                    b"",
                    "text/plain",
                    {
                        "Location": _without_token(url),
                        "Set-Cookie": f"{COOKIE}={self.app.token}; HttpOnly; SameSite=Strict; Path=/",
                    },
                )
                return
            if method == "POST" and not self._same_origin():
                return
            self._route(method, url.path, parse_qs(url.query))
        except UIError as e:
            self._error(e.status, str(e), e.fields)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # never a traceback to the client
            print(redact_text(traceback.format_exc()), file=sys.stderr)
            if self._streaming:  # headers are out: end the stream, the page reconnects
                self.close_connection = True
                return
            with contextlib.suppress(OSError):
                self._error(
                    500, f"internal error ({type(e).__name__}); the dashboard's terminal has the details"
                )

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ routes

    def _route(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        app = self.app
        parts = [p for p in path.split("/") if p]
        if method == "GET":
            if not parts:
                return self._static("index.html")
            if parts[0] == "static" and len(parts) == 2:
                return self._static(parts[1])
            if parts[0] == "runs" and len(parts) >= 3:
                from urllib.parse import unquote

                return self._file(app.file_in_run(unquote(parts[1]), unquote("/".join(parts[2:]))))
            if parts[:2] == ["api", "runs"] and len(parts) == 2:
                return self._json(
                    {"root": str(app.root), "runs": runs.list_runs(app.root, app.jobs.states())}
                )
            if parts[:2] == ["api", "configs"]:
                return self._json({"project": str(app.project), "configs": app.configs()})
            if parts[:2] == ["api", "runs"] and len(parts) >= 3:
                d = app.run_dir(parts[2])
                sub = parts[3] if len(parts) > 3 else None
                if sub is None and len(parts) == 3:
                    info = runs.detail(d, app.jobs.state(d.name))
                    info["output"] = app.jobs.output(d.name)
                    return self._json(info)
                if sub == "events" and len(parts) == 4:
                    return self._events(d)
                if sub == "log" and len(parts) == 4:
                    stage = (query.get("stage") or [""])[0]
                    if stage not in runs.trained_stages(runs.config_of(d)):
                        raise UIError(404, f"no stage {stage!r} in {d.name}")
                    rows, _ = runs.read_rows(d / stage / "log.jsonl")
                    return self._json({"stage": stage, "rows": rows})
        elif method == "POST":
            if parts == ["api", "validate"]:
                return self._json(app.validate(self._body()))
            if parts == ["api", "start"]:
                return self._json(app.start(self._body()))
            if parts[:2] == ["api", "runs"] and len(parts) == 4:
                name, action = parts[2], parts[3]
                if action == "stop":
                    return self._json(app.stop(name))
                if action == "resume":
                    return self._json(app.resume(name))
                if action == "chat":
                    return self._chat(name, self._body())
        raise UIError(404, "not found")

    def _static(self, name: str) -> None:
        if not re.fullmatch(r"[a-z0-9_-]+\.(html|js|css|svg)", name):
            raise UIError(404, "not found")
        res = resources.files("tunepipe.ui").joinpath("static", name)
        if not res.is_file():
            raise UIError(404, "not found")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        csp = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-src 'self'; connect-src 'self'"
        )
        self._send(200, res.read_bytes(), f"{ctype}; charset=utf-8", {"Content-Security-Policy": csp})

    def _file(self, path: Path) -> None:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        suffix = path.suffix.lower()
        if suffix not in TEXT_TYPES and suffix not in IMAGE_TYPES:
            raise UIError(404, "not found (the dashboard serves a run's pages, logs and plots)")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UIError(413, f"{path.name} is larger than {MAX_FILE_BYTES >> 20} MB: open it from disk")
        if suffix in (".yaml", ".yml"):
            body = redact_yaml(path.read_text(encoding="utf-8", errors="replace")).encode()
            ctype = "text/plain; charset=utf-8"
        elif suffix in TEXT_TYPES:
            body = redact_text(path.read_text(encoding="utf-8", errors="replace")).encode()
            ctype = ("text/plain" if ctype.startswith("application/octet") else ctype) + "; charset=utf-8"
        else:
            body = path.read_bytes()
        # A run's own pages (report.html) run no script here (no script source is allowed); their styles
        # and inlined plots render. (No `sandbox`: its opaque origin fails frame-ancestors 'self'.)
        csp = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; frame-ancestors 'self'"
        self._send(200, body, ctype, {"Content-Security-Policy": csp})

    # ------------------------------------------------------------------ streams

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")  # proxies: don't hold the stream back
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._streaming = True

    def _event(self, name: str, data: Any) -> None:
        payload = to_json(data)
        self.wfile.write(f"event: {name}\ndata: {payload}\n\n".encode())
        self.wfile.flush()

    def _events(self, run_dir: Path) -> None:
        """Server-sent events for a run page: `log` {stage, rows, reset} with each stage's new logged
        steps (checked every POLL_S; `reset`: the rows replace what the page has — a new connection,
        or a resumed stage that rewrote its log), `state` when pipeline.json or the job changes (the
        page then reloads its tables), `gone` when the run folder is removed, a comment every few
        seconds to keep the connection open."""
        self._start_stream()
        if self.command == "HEAD":
            return
        offsets: dict[str, int] = {}
        tails: dict[str, bytes] = {}
        last_sig: Any = None
        last_ping = time.time()
        while True:
            if not run_dir.is_dir():
                self._event("gone", {"run": run_dir.name})
                return
            cfg = runs.config_of(run_dir)
            for stage in runs.trained_stages(cfg):
                path = run_dir / stage / "log.jsonl"
                try:
                    size = path.stat().st_size
                except OSError:
                    size = 0
                off = offsets.get(stage)
                # Rewritten in place (a resumed stage keeps the steps up to its checkpoint, then
                # appends): shorter than what was read, or other bytes where the last read ended.
                reset = off is None or size < off or (off > 0 and _tail(path, off) != tails.get(stage))
                rows, offsets[stage] = runs.read_rows(path, 0 if reset else off or 0)
                tails[stage] = _tail(path, offsets[stage])
                if rows or (reset and off is not None):
                    self._event("log", {"stage": stage, "rows": rows, "reset": reset})
            pj = run_dir / "pipeline.json"
            job = self.app.jobs.state(run_dir.name)
            try:
                mtime = pj.stat().st_mtime_ns
            except OSError:
                mtime = 0
            sig = (mtime, job and job.get("running"))
            if sig != last_sig:
                last_sig = sig
                self._event("state", runs.summary(run_dir, job))
            if time.time() - last_ping > 5:
                self.wfile.write(b": ping\n\n")
                self.wfile.flush()
                last_ping = time.time()
            time.sleep(POLL_S)

    def _chat(self, name: str, body: dict[str, Any]) -> None:
        """One chat turn, streamed: `token` {text} events as the model generates, then `done` {text}
        with the cleaned reply (the same text `tunepipe chat --prompt` prints), or `error`."""
        from ..chat import ChatError, Conversation

        stage = str(body.get("stage") or "")
        text = str(body.get("prompt") or "").strip()
        history = body.get("history") or []
        if not text:
            raise UIError(400, "empty message")
        if not isinstance(history, list) or not all(
            isinstance(m, dict)
            and m.get("role") in ("user", "assistant")
            and isinstance(m.get("content"), str)
            for m in history
        ):
            raise UIError(400, "history: a list of {role: user|assistant, content}")
        self.app.run_dir(name)
        self._start_stream()
        try:
            with self.app._chat_lock:  # one generation at a time on a laptop's cores
                self._event("status", {"text": f"loading the {stage} model"})
                model = self.app.chat_model(name, stage)
                conv = Conversation(
                    model, max_new_tokens=min(max(1, int(body.get("max_new_tokens") or 256)), 2048)
                )
                conv.history = [{"role": m["role"], "content": m["content"]} for m in history]
                for piece in conv.stream(text):
                    if piece:
                        self._event("token", {"text": piece})
                self._event("done", {"text": conv.last_reply, "model": model.label})
        except (BrokenPipeError, ConnectionResetError):
            raise
        except (UIError, ChatError, ValueError) as e:
            self._event("error", {"message": str(e)})
        except Exception as e:
            print(redact_text(traceback.format_exc()), file=sys.stderr)
            self._event("error", {"message": f"{type(e).__name__}: {e}"})


def make_server(
    root: Path, project: Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None
) -> tuple[ThreadingHTTPServer, App]:
    """The dashboard's server (not yet serving). A non-loopback host without a token gets a new one."""
    loopback = is_loopback(host)
    if not loopback and not token:
        token = secrets.token_urlsafe(24)
    app = App(root, project, token, loopback)
    handler = type("BoundHandler", (Handler,), {"app": app})

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, port), handler)
    # The first run page would import the report code (seconds): warm it in the background.
    threading.Thread(target=_warm, daemon=True).start()
    return server, app


def _warm() -> None:
    with contextlib.suppress(Exception):
        import tunepipe.stages.report  # noqa: F401


def url_of(server: ThreadingHTTPServer, app: App) -> str:
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else str(host)
    if shown in ("0.0.0.0", "[::]"):
        shown = "127.0.0.1" if shown == "0.0.0.0" else "[::1]"
    return f"http://{shown}:{port}/" + (f"?token={app.token}" if app.token else "")
