"""`tunepipe push`: a trained stage's export and its model card to a Hugging Face Hub model repo.

The export is reused when it is newer than the stage's result (else made with tunepipe.export), the
card is (re)written into it with the repo id, and exactly the files `upload_plan` lists go up in one
commit (`HfApi.create_commit`; huggingface_hub decides regular or LFS per file). `--dry-run` lists
the same plan and uploads nothing. The token is huggingface_hub's own: HF_TOKEN or `hf auth login`;
tunepipe never passes, prints or writes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .export import check_stage
from .modelcard import CARD_NAME, write_model_card
from .redaction import redact_text
from .stages import registry

FORMATS = ("hf", "gguf")
EXPORT_MARKER = "tunepipe-export.json"
# Local bookkeeping of an export (it names this machine's run folder): not uploaded.
NOT_UPLOADED = {EXPORT_MARKER}
LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"


class PushError(Exception):
    """Bad input or a state the user fixes (exit code 2): the message says how."""


class UploadFailed(Exception):
    """The Hub (or the network) failed the upload (exit code 1)."""


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    local: Path
    size: int


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    folder: Path
    files: list[UploadFile]
    url: str | None  # the commit's URL; None on a dry run


def _export_is_current(folder: Path, run_dir: Path, stage: str, fmt: str) -> bool:
    """An export of this stage written after the stage last finished (so from its current weights)."""
    marker = folder / EXPORT_MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if meta.get("stage") != stage or meta.get("format", "hf") != fmt:
        return False
    weights = list(folder.glob("*.gguf")) if fmt == "gguf" else list(folder.glob("*.safetensors"))
    stage_json = run_dir / stage / "stage.json"
    return bool(weights) and marker.stat().st_mtime >= stage_json.stat().st_mtime


def prepare_export(
    cfg: Config,
    run_dir: Path,
    stage: str,
    fmt: str,
    repo_id: str | None,
    log: Callable[[str], None] = print,
) -> Path:
    """The export folder of `stage` in format `fmt` with its model card: reused when current."""
    from .export import default_out, export_model

    folder = default_out(run_dir, stage, fmt)
    if _export_is_current(folder, run_dir, stage, fmt):
        log(f"using the export in {folder} (newer than the {stage} stage)")
    else:
        export_model(cfg, run_dir, stage, folder, log=log, fmt=fmt)
    write_model_card(cfg, run_dir, stage, folder, fmt=fmt, repo_id=repo_id)
    return folder


def upload_plan(folder: Path) -> list[UploadFile]:
    """Every file of the export folder that goes to the repo, sorted: hidden files and the local
    export marker left out."""
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if (
            not p.is_file()
            or any(part.startswith(".") for part in rel.parts)
            or rel.as_posix() in NOT_UPLOADED
        ):
            continue
        files.append(UploadFile(rel.as_posix(), p, p.stat().st_size))
    if not any(f.path_in_repo == CARD_NAME for f in files):
        raise PushError(f"{folder}: no {CARD_NAME} (model card) to upload")
    return files


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(
            f"--repo {repo_id!r}: not a Hub repo id ({e}); write it like your-name/my-model"
        ) from None


def _check_can_upload() -> str:
    """The Hub endpoint, after checking a token exists and the hub is not switched off."""
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise PushError(
            "the Hub is switched off here (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): unset it to push"
        )
    if not get_token():
        raise PushError(f"no Hugging Face token: {LOGIN_HINT} (a token with write access)")
    return constants.ENDPOINT


def upload(repo_id: str, files: list[UploadFile], private: bool, message: str) -> str:
    """Create the repo if needed and commit `files` to it; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = _check_can_upload()
    api = HfApi()  # token: huggingface_hub's own lookup (HF_TOKEN, then the login's token file)
    try:
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        ops = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local)) for f in files]
        info = api.create_commit(url.repo_id, ops, commit_message=message, repo_type="model")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise PushError(
                f"the Hub refused the token (HTTP {status}) for {repo_id}: {LOGIN_HINT} with a token that "
                "can write to that namespace"
            ) from None
        raise UploadFailed(f"the Hub answered HTTP {status} for {repo_id}: {redact_text(str(e))}") from None
    except (OSError, *_network_errors()) as e:
        raise UploadFailed(f"cannot reach {endpoint}: {type(e).__name__}: {redact_text(str(e))}") from None
    return str(info.commit_url)


def _network_errors() -> tuple[type[BaseException], ...]:
    """The connection / timeout errors of the HTTP client huggingface_hub uses (it has changed over
    versions: requests, httpx, httpx2)."""
    import importlib

    found: list[type[BaseException]] = []
    clients = (("httpx2", "RequestError"), ("httpx", "RequestError"), ("requests", "RequestException"))
    for module, name in clients:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def push(
    cfg: Config,
    run_dir: Path,
    stage: str,
    repo_id: str,
    *,
    private: bool = False,
    fmt: str = "hf",
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> PushResult:
    """Export `stage` (or reuse its export), write its card, and upload both to `repo_id` (on a dry
    run: only list what would go up)."""
    if fmt not in FORMATS:
        raise PushError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    check_repo_id(repo_id)
    check_stage(cfg, run_dir, stage)
    if not dry_run:
        _check_can_upload()  # before an export that can take minutes
    folder = prepare_export(cfg, run_dir, stage, fmt, repo_id, log=log)
    files = upload_plan(folder)
    if dry_run:
        return PushResult(repo_id, folder, files, None)
    message = f"tunepipe: {registry.title(stage)} model of {cfg.project.name} ({fmt})"
    return PushResult(repo_id, folder, files, upload(repo_id, files, private, redact_text(message)))


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            break
    return f"{size:.1f} {unit}"
