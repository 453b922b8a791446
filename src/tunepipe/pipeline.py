"""Stage order, the state file (pipeline.json), input fingerprints, gates and skipping.

A stage is up to date when its stage.json says done and its fingerprint is unchanged. The fingerprint
covers the config keys the stage reads, its input files, the code version and the fingerprints of
the stages it reads from. When a stage runs, every later stage is marked stale.

Checking fingerprints imports neither torch nor transformers, so a run with nothing to do is fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, dump_resolved
from .console import capture_library_output
from .data.sources import Input, SourceError, expand
from .dist import is_main, rank
from .preflight import require
from .redaction import redact_text
from .runfolder import is_write_error, run_lock, write_atomic
from .stages import GateFailed, StageContext, StageResult, StageStopped, write_stage_json

if TYPE_CHECKING:
    from .launch import Group

MODEL_KEYS = [
    "model.name_or_path",
    "model.revision",
    "model.chat_template",
    "model.enable_thinking",
    "model.trust_remote_code",
]
TRAIN_MODEL_KEYS = [*MODEL_KEYS, "model.attn_implementation", "model.dtype", "model.load_in_4bit"]
# How the model is spread over the processes: a sharded checkpoint (FSDP, ZeRO) does not resume under
# another engine. The number of processes is not an input: a finished stage stays done on another
# machine (its effective batch was the one it trained with; --force trains again).
TRAIN_HARDWARE_KEYS = ["hardware.sharding"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    keys: list[str]  # dotted config keys (or whole sections) the stage reads
    upstream: list[str]
    stage_dir: str
    launched: bool = False  # runs as a process group when the run has several processes


def _fixed(name: str, trained: list[str], cfg_keys: list[str]) -> StageSpec:
    if name == "data":
        return StageSpec("data", "tunepipe.stages.data", [*MODEL_KEYS, "data", *cfg_keys], [], "data")
    if name == "eval":
        keys = [*TRAIN_MODEL_KEYS, "eval", *cfg_keys]
        return StageSpec("eval", "tunepipe.stages.eval", keys, ["data", *trained], "eval", launched=True)
    return StageSpec(
        "report",
        "tunepipe.stages.report",
        ["project", "report", "model.name_or_path", *cfg_keys],
        ["data", *trained, "eval"],
        "report",
    )


def stage_specs(cfg: Config) -> dict[str, StageSpec]:
    """Every stage of this config's run, in order: data, the training stages of `pipeline` (each
    reading the data and every trained stage before it), eval, report."""
    from .stages import registry

    trained = registry.trained(cfg)
    # Which stages train, and in which order, is an input of the stages that read them all.
    order_keys = ["pipeline", *(f"{s}.enabled" for s in cfg.pipeline)]
    specs = {"data": _fixed("data", trained, order_keys)}
    for name in cfg.pipeline:
        specs[name] = StageSpec(
            name,
            registry.get(name).module,
            [*TRAIN_MODEL_KEYS, *TRAIN_HARDWARE_KEYS, "training", name, "data.max_length"],
            ["data", *trained[: trained.index(name)]] if name in trained else ["data"],
            name,
            launched=True,
        )
    for name in registry.LAST:
        specs[name] = _fixed(name, trained, order_keys)
    return specs


def spec_of(name: str) -> StageSpec:
    """A stage's module and folder, from its name alone (a launched process, a state file rebuilt)."""
    from .stages import registry

    if registry.is_training_stage(name):
        return StageSpec(name, registry.get(name).module, [], [], name, launched=True)
    return _fixed(name, [], [])


def order(cfg: Config) -> list[str]:
    return list(stage_specs(cfg))


def check_stage_name(cfg: Config, name: str, names: list[str] | None = None) -> None:
    """A stage named on the command line must be one of this config's run (ConfigError, exit 2)."""
    from .config import ConfigError
    from .stages import registry

    names = names or order(cfg)
    if name in names:
        return
    if registry.is_training_stage(name):
        raise ConfigError(
            f"{cfg.source}: stage {name!r} is not in this config's pipeline ({', '.join(cfg.pipeline)}); "
            f"add it, e.g. pipeline=[{', '.join([*cfg.pipeline, name])}]"
        )
    raise ConfigError(f"no stage {name!r}: this run's stages are {', '.join(names)}")


def run_dir_for(cfg: Config, smoke: bool) -> Path:
    """Smoke runs go to a sibling folder so they never touch a real run's state."""
    out = cfg.output_dir
    return out.with_name(out.name + "-smoke") if smoke else out


def enabled(cfg: Config, name: str) -> bool:
    from .stages import registry

    return cfg.stage(name).enabled if registry.is_training_stage(name) else True


# --------------------------------------------------------------------------- fingerprints


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_FILE_HASH_LIMIT = 64 << 20


def file_fingerprint(path: Path) -> str:
    """Content hash for files up to 64 MiB; size + mtime beyond (hashing GBs on every run is too slow)."""
    st = path.stat()
    if st.st_size <= _FILE_HASH_LIMIT:
        return _sha(path.read_bytes())
    return f"size={st.st_size},mtime={st.st_mtime_ns}"


def code_version() -> str:
    """tunepipe's version plus a hash of its source, so a code change reruns what it may affect."""
    from . import __version__

    root = Path(__file__).parent
    h = hashlib.sha256(__version__.encode())
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def _get(cfg_dump: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg_dump
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _input_files(cfg: Config, name: str) -> dict[str, str]:
    files: dict[str, str] = {}
    if name == "data":
        from .stages import registry

        for stage in registry.trained(cfg):
            sd = getattr(cfg.data, stage)
            for src in [*sd.train, *sd.eval]:
                try:
                    for inp in expand(cfg.path(src.path), src.path, src.split):
                        files[str(inp)] = inp.fingerprint()
                except SourceError:
                    files[src.path] = "missing"  # the data stage reports it properly
        if cfg.model.chat_template and cfg.path(cfg.model.chat_template).is_file():
            p = cfg.path(cfg.model.chat_template)
            files[str(p)] = file_fingerprint(p)
    if name == "eval":
        # Sets read from files, local lm-eval tasks and the user's scorer modules are inputs too.
        from .stages.registry import prepared_sets

        paths = [cfg.path(s.source) for s in cfg.eval.sets if s.source not in prepared_sets()]
        if cfg.eval.lm_eval and cfg.eval.lm_eval.include_path:
            paths.append(cfg.path(cfg.eval.lm_eval.include_path))
        metric_names = [*cfg.eval.metrics, *(m for s in cfg.eval.sets for m in s.metrics or [])]
        paths += [cfg.path(m.split(":")[0].replace(".", "/") + ".py") for m in metric_names if ":" in m]
        for p in paths:
            if p.is_file():
                files[str(p)] = file_fingerprint(p)
            elif p.is_dir():
                files[str(p)] = Input("file", str(p)).fingerprint()
            else:
                files[str(p)] = "missing"
    return files


def _model_files(cfg: Config) -> str:
    """A local model folder is fingerprinted by its config and weight file sizes/mtimes."""
    p = cfg.path(cfg.model.name_or_path)
    if not p.is_dir():
        return cfg.model.name_or_path
    parts = [
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(p.iterdir()) if f.is_file()
    ]
    return _sha("\n".join(parts).encode())


# Config keys inside a stage's sections that do not change what the stage makes.
NOT_INPUTS = ("training.report_to",)  # where the metrics are sent: adding a tracker retrains nothing


def fingerprint(cfg: Config, name: str, upstream: dict[str, str], smoke: bool, code: str) -> str:
    dump = cfg.model_dump(mode="json")
    for key in NOT_INPUTS:
        *parents, last = key.split(".")
        node = _get(dump, ".".join(parents))
        if isinstance(node, dict):
            node.pop(last, None)
    spec = stage_specs(cfg)[name]
    payload = {
        "stage": name,
        "config": {k: _get(dump, k) for k in spec.keys},
        "files": _input_files(cfg, name),
        "model": _model_files(cfg),
        "upstream": {u: upstream.get(u) for u in spec.upstream},
        "smoke": smoke,
        "code": code,
    }
    return _sha(json.dumps(payload, sort_keys=True, default=str).encode())


# --------------------------------------------------------------------------- state


class State:
    """pipeline.json: one record per stage {status, fingerprint, started_at, seconds, gates, summary}.

    An unreadable pipeline.json (empty after a full disk, cut, edited by hand) does not block the
    folder: it is set aside as pipeline.json.corrupt-<time>, and the records are rebuilt from each
    stage's stage.json (which holds the stage's fingerprint), so finished stages still count."""

    def __init__(self, run_dir: Path, repair: bool = True):
        self.path = run_dir / "pipeline.json"
        self.run_dir = run_dir
        self.repair = repair and is_main()  # False: read only (planning before the lock is held)
        self.note: str | None = None  # what was done about an unreadable state file, to be logged
        self.data: dict[str, Any] = self._load()
        self.data.setdefault("stages", {})

    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
                raise ValueError("not a tunepipe state object")
            return data
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            why = "empty" if self.path.is_file() and self.path.stat().st_size == 0 else str(e)
        aside = self.path.with_name(f"pipeline.json.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        if self.repair:
            self.path.replace(aside)
        stages = self._from_stage_files()
        self.note = (
            f"warning: {self.path} was unreadable ({why}); kept as {aside.name}. Stage records rebuilt "
            f"from stage.json files: {', '.join(stages) or 'none'} done; other stages run again"
        )
        return {"stages": stages}

    def _from_stage_files(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        from .stages.registry import all_stage_names

        for name in all_stage_names():
            sj = self.run_dir / spec_of(name).stage_dir / "stage.json"
            try:
                rec = json.loads(sj.read_text(encoding="utf-8")) if sj.is_file() else {}
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and rec.get("status") == "done" and rec.get("fingerprint"):
                keep = ("status", "fingerprint", "seconds", "summary", "gates", "started_at")
                out[name] = {k: rec.get(k) for k in keep}
        return out

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def set(self, name: str, **fields: Any) -> None:
        self.data["stages"][name] = {**self.stage(name), **fields}
        self.save()

    def save(self) -> None:
        if not is_main():
            return
        self.data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_atomic(self.path, json.dumps(self.data, indent=2))


def is_up_to_date(run_dir: Path, state: State, name: str, fp: str) -> bool:
    rec = state.stage(name)
    sj = run_dir / spec_of(name).stage_dir / "stage.json"
    if rec.get("status") != "done" or rec.get("fingerprint") != fp or not sj.is_file():
        return False
    try:
        done = json.loads(sj.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a cut stage.json: the stage is not done, it runs again
        return False
    return isinstance(done, dict) and done.get("status") == "done"


def write_env(run_dir: Path) -> None:
    if not is_main():
        return
    pkgs = {}
    for p in (
        "tunepipe",
        "torch",
        "transformers",
        "trl",
        "peft",
        "datasets",
        "accelerate",
        "bitsandbytes",
        "deepspeed",
        "flash-attn",
        "liger-kernel",
    ):
        try:
            pkgs[p] = version(p)
        except PackageNotFoundError:
            pkgs[p] = None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": pkgs,
    }
    import torch

    from .modeling import cpu_supports_bf16

    env["cuda"] = torch.cuda.is_available()
    env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env["cpu_bf16"] = cpu_supports_bf16()
    env["torch_threads"] = torch.get_num_threads()
    write_atomic(run_dir / "env.json", json.dumps(env, indent=2))


# --------------------------------------------------------------------------- running


class StageLog:
    """Console + logs/<stage>.log."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None]):
        self.dir = run_dir / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.file: Any = None

    def open(self, stage: str) -> None:
        self.close()
        suffix = "" if is_main() else f".rank{rank()}"  # other processes of a DDP run: their own file
        self.file = (self.dir / f"{stage}{suffix}.log").open("a", encoding="utf-8")

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None

    @property
    def path(self) -> Path | None:
        return Path(self.file.name) if self.file else None

    def __call__(self, msg: str) -> None:
        msg = redact_text(msg)
        if is_main():
            self.echo(msg)
        if self.file:
            self.file.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            self.file.flush()


def run_pipeline(
    cfg: Config,
    *,
    stages: list[str] | None = None,
    smoke: bool = False,
    from_stage: str | None = None,
    force: bool = False,
    verbose: bool = False,
    echo: Callable[[str], None] = print,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> dict[str, str]:
    """Run `stages` (default: all, skipping the up-to-date ones). Returns {stage: outcome}.

    With several processes (hardware.processes, several GPUs, hardware.nodes) this process is the
    controller: the training and eval stages run as process groups it launches (launch.Group); on
    nodes other than 0 it follows node 0's launches. Inside an existing process group (torchrun,
    accelerate launch) every process runs the stages itself and only the main one writes.

    Explicitly named stages always run; upstream stages they need must be done already. Before the
    first stage: the preflight (preflight.require: packages, data, model, the run folder) and the run
    folder's lock (one writer at a time). Raises PreflightFailed or RunFolderBusy before anything is
    written, GateFailed when a gate fails; other errors propagate after the state is recorded.
    """
    run_dir = run_dir_for(cfg, smoke)
    names = order(cfg)
    for named in [*(stages or []), *([from_stage] if from_stage else [])]:
        check_stage_name(cfg, named, names)
    selected = stages or names
    if from_stage:
        selected = names[names.index(from_stage) :]
    forced = set(stages or []) | (set(selected) if from_stage or force else set())
    from .launch import in_process_group, maybe_group, topology

    if not is_main():  # under DDP the main process checks, locks and writes; the others train
        return _run_stages(cfg, run_dir, selected, forced, smoke, verbose, echo)
    topo = None if in_process_group() else topology(cfg, node_rank, master_addr, master_port)
    if topo is not None and topo.node_rank > 0:
        from .launch import follow

        return follow(cfg, run_dir, topo, echo)  # node 0 checks, locks, plans and writes
    # Fingerprints need no weights: the plan of what runs is known before anything starts.
    state = State(run_dir, repair=False)
    code = code_version()
    plan = _plan(cfg, run_dir, state, selected, forced, smoke, code)
    require(cfg, [name for name, (_, todo) in plan.items() if todo], run_dir)
    with run_lock(run_dir), maybe_group(cfg, topo, run_dir, echo) as group:
        return _run_stages(cfg, run_dir, selected, forced, smoke, verbose, echo, group)


def _plan(
    cfg: Config, run_dir: Path, state: State, selected: list[str], forced: set[str], smoke: bool, code: str
) -> dict[str, tuple[str, bool]]:
    """{stage: (fingerprint, runs)} for the enabled stages; raises GateFailed when a named stage needs
    an upstream stage that is neither done nor selected."""
    fps: dict[str, str] = {}
    plan: dict[str, tuple[str, bool]] = {}
    specs = stage_specs(cfg)
    for name in specs:
        if not enabled(cfg, name):
            continue
        fp = fingerprint(cfg, name, fps, smoke, code)
        fps[name] = fp
        if name not in selected:
            continue
        runs = name in forced or not is_up_to_date(run_dir, state, name, fp)
        if runs:
            for u in specs[name].upstream:
                if enabled(cfg, u) and u not in selected and not is_up_to_date(run_dir, state, u, fps[u]):
                    raise GateFailed(
                        f"[{name}] needs stage '{u}' to be done and up to date first: "
                        f"run `tunepipe run {cfg.source}` (or the '{u}' stage)"
                    )
        plan[name] = (fp, runs)
    return plan


def _run_stages(
    cfg: Config,
    run_dir: Path,
    selected: list[str],
    forced: set[str],
    smoke: bool,
    verbose: bool,
    echo: Callable[[str], None],
    group: Group | None = None,
) -> dict[str, str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    state = State(run_dir)  # under the lock: an unreadable state file is set aside here, not before
    log = StageLog(run_dir, echo)
    if state.note:
        log(state.note)
    if is_main():
        write_atomic(run_dir / "config.resolved.yaml", dump_resolved(cfg))
    state.data["config"] = cfg.source
    from . import runfolder

    if runfolder.INVOCATION is not None:  # the `tunepipe` command: `tunepipe ui` resumes with the same one
        argv = [redact_text(a) for a in runfolder.INVOCATION]
        state.data["command"] = {"argv": argv, "cwd": os.getcwd(), "resumable": argv == runfolder.INVOCATION}
    code = code_version()
    plan = _plan(cfg, run_dir, state, selected, forced, smoke, code)
    limit = cfg.hardware.time_limit_s
    budget_end = time.time() + limit if limit else None
    state.data["budget_end"] = budget_end  # this invocation's deadline (hardware.time_limit from its start)
    outcome: dict[str, str] = {}
    env_written = False
    specs = stage_specs(cfg)
    for name in specs:
        if not enabled(cfg, name):
            state.set(name, status="disabled")
            outcome[name] = "disabled"
            continue
        if name not in plan:
            continue
        fp, runs = plan[name]
        if not runs:
            echo(f"[{name}] skipped (up to date)")
            outcome[name] = "skipped"
            continue
        if group is not None and group.stop_reason:  # SIGTERM/SIGINT came between two stages
            log.close()
            raise StageStopped(f"[{name}] not started: {group.stop_reason}; run the same command again")
        if not env_written:
            write_env(run_dir)
            env_written = True
        deadline = _stage_deadline(cfg, name, selected, budget_end)
        ctx = StageContext(
            cfg=cfg,
            run_dir=run_dir,
            smoke=smoke,
            log=log,
            fingerprint=fp,
            deadline=deadline,
            verbose=verbose,
            budget_end=budget_end,
        )
        launch = group.run if group is not None and specs[name].launched else None
        outcome[name] = _run_stage(ctx, name, state, log, launch)
    log.close()
    return outcome


def _stage_deadline(cfg: Config, name: str, selected: list[str], budget_end: float | None) -> float | None:
    """This stage's share of the time left: shares of the stages still to run, normalised."""
    if budget_end is None:
        return None
    left = budget_end - time.time()
    if left <= 0:
        raise StageStopped(
            f"[{name}] not started: hardware.time_limit {cfg.hardware.time_limit} is used up; "
            "run again to continue"
        )
    names = order(cfg)
    todo = [s for s in names[names.index(name) :] if s in selected and enabled(cfg, s)]
    return time.time() + left * cfg.hardware.share(name, todo)


def _run_stage(
    ctx: StageContext,
    name: str,
    state: State,
    log: StageLog,
    launch: Callable[[StageContext, str], StageResult] | None = None,
) -> str:
    """Run one stage in this process, or as a process group through `launch` (launch.Group.run)."""
    spec = spec_of(name)
    fp, run_dir = ctx.fingerprint, ctx.run_dir
    log.open(name)
    log(f"[{name}] running" + (" (smoke)" if ctx.smoke else ""))
    started = time.time()
    # A stage stopped (exit 75) or failed under the same inputs resumes from its checkpoint: its
    # time so far counts towards the stage's total.
    prev = state.stage(name)
    resumed = prev.get("attempt") == fp and prev.get("status") in ("stopped", "failed")
    carried = float(prev.get("seconds") or 0.0) if resumed else 0.0
    segments = (prev.get("segments") or 1) + 1 if carried else 1

    def seconds() -> float:
        return round(carried + time.time() - started, 1)

    # Everything after this stage depends on its outputs: mark it stale before touching anything.
    names = order(ctx.cfg)
    for later in names[names.index(name) + 1 :]:
        if state.stage(later).get("status") == "done":
            state.set(later, status="stale")
    state.set(
        name,
        status="running",
        fingerprint=None,
        attempt=fp,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        summary=None,
        gates=[],
        error=None,
        segments=segments,
    )
    stage_dir = run_dir / spec.stage_dir
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "stage.json").unlink(missing_ok=True)
    try:
        module = importlib.import_module(spec.module)
        # Library warnings and the trainers' raw log lines go to the stage's log (and, with
        # --verbose, to the terminal too); the console keeps one readable line per logged step.
        with capture_library_output(log.file, verbose=ctx.verbose):
            result: StageResult = launch(ctx, name) if launch else module.run(ctx)
    except StageStopped as e:
        _record_failure(
            state, name, status="stopped", seconds=seconds(), error=str(e), stopped_at=time.time()
        )
        log(str(e))
        log.close()
        raise
    except BaseException as e:
        _record_failure(
            state,
            name,
            status="failed",
            seconds=seconds(),
            error=redact_text(f"{type(e).__name__}: {e}")[:2000],
        )
        if is_write_error(e) and not e.filename:  # type: ignore[attr-defined]
            e.filename = str(stage_dir)  # type: ignore[attr-defined]  # at least the stage's folder
        # A launched process's own traceback (launch.WorkerFailed), not the controller's.
        tb = getattr(e, "worker_log", "") or traceback.format_exc()
        if log.file:
            log.file.write(redact_text(tb))
            with contextlib.suppress(AttributeError, TypeError):
                e.tunepipe_log = str(log.path)  # type: ignore[attr-defined]  # the CLI names it
        # A launched process killed from outside (SIGKILL, the OOM killer) left no traceback: the
        # message naming it is the diagnosis.
        died = "Traceback" not in getattr(e, "worker_log", "Traceback")
        if (
            not isinstance(e, KeyboardInterrupt | GateFailed)
            and not is_write_error(e)
            and not _is_bad_input(e)
            and not died
        ):
            _write_diagnosis(run_dir / "logs", name, tb, log)
        log.close()
        raise
    bad = result.failed_gates()
    status = "failed" if bad else "done"
    if is_main():
        write_stage_json(stage_dir, name, result, started, status, fingerprint=fp if not bad else None)
    state.set(
        name,
        status=status,
        fingerprint=fp if not bad else None,
        seconds=seconds(),
        summary=result.summary,
        gates=[g.__dict__ for g in result.gates],
        error=None,
    )
    for g in result.gates:
        log(f"[{name}] gate {g.name}: {'passed' if g.passed else 'FAILED'} ({g.detail})")
    log(f"[{name}] {status} in {seconds():.0f} s: {result.summary}")
    if bad:
        log.close()
        raise GateFailed(f"[{name}] gate failed: " + "; ".join(f"{g.name}: {g.detail}" for g in bad))
    return "done"


def _record_failure(state: State, name: str, **fields: Any) -> None:
    """Record a stopped or failed stage; a state file that cannot be written (the disk that made the
    stage fail is full) must not hide the stage's own error."""
    with contextlib.suppress(OSError):
        state.set(name, **fields)


def _is_bad_input(e: BaseException) -> bool:
    """Bad config or data: the message already names the file, line and fix; no diagnosis needed."""
    from .config import ConfigError
    from .data.chat import TemplateError
    from .data.prepare import DataError

    return isinstance(e, ConfigError | DataError | TemplateError)


def _write_diagnosis(logs: Path, stage: str, tb: str, log: Callable[[str], None]) -> None:
    """An unexpected failure: what `tunepipe diagnose` would say about it, printed and saved next to
    the stage's log (logs/<stage>.diagnosis.txt and .json)."""
    try:
        from .diagnose import diagnose_text, diagnosis_json, format_diagnosis

        d = diagnose_text(tb)
        text = format_diagnosis(d)
        if is_main():
            (logs / f"{stage}.diagnosis.txt").write_text(text + "\n", encoding="utf-8")
            (logs / f"{stage}.diagnosis.json").write_text(json.dumps(diagnosis_json(d), indent=2))
        log(text)
    except Exception as err:  # the diagnosis must never hide the original error
        log(f"(no diagnosis: {type(err).__name__}: {err})")
