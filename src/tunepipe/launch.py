"""Processes and nodes: how many processes a run uses (`Topology`), launching a stage as one process
group with torch's elastic launcher (`Group`), the worker each launched process runs, the follower
loop of the other nodes, and the rank agreement the guards use so that every process decides together.

`tunepipe run` on one machine with N GPUs (or `hardware.processes: N`) is the *controller*: it checks,
locks, prepares the data and writes the report itself, and launches each training stage and the eval
stage as a process group (`python -m tunepipe.launch JOB` in every process, with RANK, WORLD_SIZE, ...
set by torch.distributed.elastic). The workers call the stage's `run(ctx)` exactly as one process does;
rank 0 writes the run folder, and every rank writes its outcome to `.launch/<stage>/rank<N>.json`,
which the controller turns back into the stage's result, a stop (exit 75), a gate or an error.
Inside an already launched process group (torchrun, accelerate launch) nothing is launched again.

Several nodes: node 0 is the controller; the others (`--node-rank`, NODE_RANK or Slurm's SLURM_NODEID)
follow it: a TCPStore on the master address (master port + 1) tells them which stage to join.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError
from .runfolder import write_atomic
from .stages import Gate, GateFailed, StageContext, StageResult, StageStopped

EXIT_GROUP_OOM = 76  # a worker ran out of memory: the controller relaunches with half the micro-batch
DEFAULT_MASTER_PORT = 29500
SHUTDOWN_TIMEOUT_S = 20  # the others get SIGTERM when a process dies, SIGKILL this much later
FOLLOW_TIMEOUT_S = 48 * 3600  # how long a follower node waits for the controller's next stage
CONNECT_TIMEOUT_S = 1800  # how long a follower node waits for node 0 to start


class LaunchError(ConfigError):
    """The processes or nodes cannot be set up as asked (exit 2): the message says what to change."""


class WorkerFailed(RuntimeError):
    """A launched process raised or died; the message names its rank. `worker_log` is the text the
    diagnosis reads (that process's traceback, or its log's last lines)."""

    def __init__(self, message: str, worker_log: str = ""):
        super().__init__(message)
        self.worker_log = worker_log


class GroupOutOfMemory(Exception):
    """Raised in a worker on out-of-memory under a process group: the group cannot halve its batch in
    step (the others wait in a collective), so the controller relaunches it at half the micro-batch."""

    def __init__(self, where: str, batch: int, accum: int):
        super().__init__(
            f"out of memory {where} at micro-batch {batch}: `tunepipe run` relaunches every process at "
            f"half the micro-batch; under another launcher set per_device_train_batch_size={batch // 2} "
            f"and gradient_accumulation_steps={accum * 2} (same effective batch)"
        )
        self.where, self.batch, self.accum = where, batch, accum


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    processes: int  # per node
    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    why: str  # where the numbers came from, for the log

    @property
    def world(self) -> int:
        return self.processes * self.nodes


def in_process_group(env: dict[str, str] | None = None) -> bool:
    """Started by torchrun / accelerate launch / our own launcher: the processes exist already."""
    env = dict(os.environ) if env is None else env
    return "LOCAL_RANK" in env and "RANK" in env


def visible_gpus(env: dict[str, str] | None = None) -> int:
    """CUDA GPUs this process may use, without importing torch where there is no NVIDIA driver."""
    env = dict(os.environ) if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return 0
    if not Path("/proc/driver/nvidia/gpus").is_dir():
        return 0
    import torch

    return torch.cuda.device_count()


def slurm_hosts(nodelist: str) -> list[str]:
    """Expand SLURM_JOB_NODELIST (`gpu[01-03,07],login1`) with `scontrol show hostnames` when it is
    there, by the same rules otherwise."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def topology(
    cfg: Config,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    env: dict[str, str] | None = None,
) -> Topology:
    """Processes per node, nodes, this node's rank and the rendezvous address: the command line wins,
    then the standard variables (NODE_RANK, MASTER_ADDR, MASTER_PORT, WORLD_SIZE), then Slurm's
    (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST), then the config."""
    env = dict(os.environ) if env is None else env
    src = cfg.source
    why = []
    gpus = visible_gpus(env)
    processes = cfg.hardware.processes or max(gpus, 1)
    why.append(
        f"{processes} process(es) per node "
        + ("(hardware.processes)" if cfg.hardware.processes else f"(one per visible GPU: {gpus})")
    )
    nodes = cfg.hardware.nodes
    slurm_nodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if slurm_nodes and "SLURM_JOB_ID" in env:
        if cfg.hardware.nodes not in (1, int(slurm_nodes)):
            raise LaunchError(
                f"{src}: hardware.nodes is {cfg.hardware.nodes} but this Slurm job has {slurm_nodes} "
                f"nodes (SLURM_NNODES); set hardware.nodes: {slurm_nodes} or change #SBATCH --nodes"
            )
        nodes = int(slurm_nodes)
    if "NNODES" in env:
        nodes = int(env["NNODES"])
    if node_rank is None:
        for var in ("NODE_RANK", "SLURM_NODEID"):
            if env.get(var, "").isdigit():
                node_rank = int(env[var])
                why.append(f"node rank from {var}")
                break
    node_rank = node_rank or 0
    if not 0 <= node_rank < nodes:
        raise LaunchError(
            f"{src}: node rank {node_rank} is outside hardware.nodes {nodes} (ranks 0..{nodes - 1}); "
            "give each node its own --node-rank"
        )
    if "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) != processes * nodes:
        raise LaunchError(
            f"WORLD_SIZE={env['WORLD_SIZE']} in the environment, but {nodes} node(s) x {processes} "
            f"process(es) = {processes * nodes}; unset WORLD_SIZE or set hardware.nodes / hardware.processes"
        )
    addr = master_addr or env.get("MASTER_ADDR")
    if not addr and env.get("SLURM_JOB_NODELIST") and nodes > 1:
        addr = slurm_hosts(env["SLURM_JOB_NODELIST"])[0]
        why.append("master address: the Slurm job's first node")
    if not addr:
        if nodes > 1:
            raise LaunchError(
                f"{src}: hardware.nodes is {nodes}: give every node the address of node 0 "
                "(--master-addr HOST or MASTER_ADDR), or run under Slurm"
            )
        addr = "127.0.0.1"
    port = master_port or int(env.get("MASTER_PORT") or 0) or (DEFAULT_MASTER_PORT if nodes > 1 else 0)
    return Topology(processes, nodes, node_rank, addr, port, "; ".join(why))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- rank agreement


def _collective_device() -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_max(value: int) -> int:
    """The largest `value` any process holds (the value itself outside a process group). Every process
    must call it at the same point: the guards call it once per step."""
    if not group_active():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def agree_all(flag: bool) -> bool:
    """True only when every process holds True (a NaN on any one rank makes it False for all)."""
    return agree_max(0 if flag else 1) == 0


# --------------------------------------------------------------------------- controller side


def _quiet_elastic() -> None:
    # torchelastic logs its launch config and every worker state change at INFO/WARNING; tunepipe
    # says what matters (which rank failed) itself.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)


class Group:
    """The controller's handle on the process groups of one `tunepipe run`: launches a stage's group,
    relaunches it at half the micro-batch when a process runs out of memory, and turns SIGTERM/SIGINT
    into a stop that every process applies at the same step."""

    def __init__(self, cfg: Config, topo: Topology, run_dir: Path, echo: Callable[[str], None]):
        self.cfg, self.topo, self.run_dir, self.echo = cfg, topo, run_dir, echo
        self.stop_reason: str | None = None
        self._stop_file: Path | None = None
        self._seq = 0
        self._old: dict[int, Any] = {}
        self.token = secrets.token_hex(8)
        self.store: Any = None

    # -- signals -------------------------------------------------------------------------------
    def __enter__(self) -> Group:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._on_signal)
        if self.topo.nodes > 1:
            self.store = _control_store(self.topo, leader=True)
            self.store.set("tunepipe/token", self.token)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        if self.store is not None:
            end = {"end": True, "ok": exc_type is None, "error": str(exc[0]) if exc and exc[0] else None}
            self.store.set(f"tunepipe/job/{self._seq}", json.dumps(end))
            time.sleep(0.5)  # the followers read it before the store (ours) goes away

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stop_reason is None:
            self.stop_reason = f"signal {name}"
            self.echo(
                f"{name}: every process stops at the same step with a complete checkpoint "
                "(exit 75; run the same command again to resume)"
            )
        if self._stop_file is not None:
            with contextlib.suppress(OSError):
                self._stop_file.write_text(self.stop_reason)

    # -- one stage -----------------------------------------------------------------------------
    def run(self, ctx: StageContext, name: str) -> StageResult:
        job_dir = self.run_dir / ".launch" / name
        micro: tuple[int, int] | None = None
        changes: list[str] = []
        while True:
            shutil.rmtree(job_dir, ignore_errors=True)
            job_dir.mkdir(parents=True)
            self._stop_file = job_dir / "stop"
            if self.stop_reason:
                self._stop_file.write_text(self.stop_reason)
            job = {
                "stage": name,
                "config": self.cfg.source,
                "overrides": self.cfg.overrides,
                "run_dir": str(self.run_dir),
                "smoke": ctx.smoke,
                "verbose": ctx.verbose,
                "fingerprint": ctx.fingerprint,
                "deadline": ctx.deadline,
                "budget_end": ctx.budget_end,
                "micro_batch": micro,
                "batch_changes": changes,
                "token": self.token,
                "stop_file": str(self._stop_file),
            }
            job_path = job_dir / "job.json"
            write_atomic(job_path, json.dumps(job, indent=2))
            ctx.log(
                f"[{name}] launching {self.topo.world} process{'es' if self.topo.world > 1 else ''} "
                f"({self.topo.nodes} node(s) x "
                f"{self.topo.processes}; {self.topo.why})"
            )
            failures = self._launch(name, job_path)
            results = _read_results(job_dir)
            oom = next((r for _, r in sorted(results.items()) if r.get("kind") == "oom"), None)
            if oom is not None and failures:
                batch, accum = oom["batch"], oom["accum"]
                change = (
                    f"out of memory on rank {oom['rank']} {oom['where']}: micro-batch {batch} -> "
                    f"{batch // 2}, gradient accumulation {accum} -> {accum * 2} on every process "
                    "(same effective batch)"
                )
                changes.append(change)
                ctx.log(f"{name}: {change}; relaunching from the newest complete checkpoint")
                micro = (batch // 2, accum * 2)
                continue
            self._stop_file = None
            return _outcome(name, results, failures, self.run_dir)

    def _launch(self, name: str, job_path: Path) -> dict[int, Any]:
        """Run the group to its end; {global rank: ProcessFailure} for the processes that failed."""
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        _quiet_elastic()
        self._seq += 1
        port = self.topo.master_port or free_port()
        if self.store is not None:  # the followers join the same rendezvous
            self.store.set(
                f"tunepipe/job/{self._seq - 1}",
                json.dumps({"stage": name, "job": str(job_path), "port": port, "seq": self._seq}),
            )
        config = LaunchConfig(
            min_nodes=self.topo.nodes,
            max_nodes=self.topo.nodes,
            nproc_per_node=self.topo.processes,
            run_id=f"tunepipe-{name}-{self._seq}-{self.token}",
            rdzv_backend="static",
            rdzv_endpoint=f"{self.topo.master_addr}:{port}",
            rdzv_configs={"rank": self.topo.node_rank, "timeout": 900},
            max_restarts=0,
            monitor_interval=0.5,
            start_method="spawn",
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        return _launch_in_thread(config, job_path, elastic_launch, ChildFailedError)


def _launch_in_thread(config: Any, job_path: Path, elastic_launch: Any, child_failed: type) -> dict[int, Any]:
    """elastic_launch in a thread: the main thread keeps its signal handlers (the Group's), which
    torchelastic would replace with its own (it kills the workers at once, with no checkpoint)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            elastic_launch(config, sys.executable)("-m", "tunepipe.launch", str(job_path))
            box["failures"] = {}
        except child_failed as e:
            box["failures"] = dict(e.failures)
        except BaseException as e:  # rendezvous timeout, a port in use: the controller re-raises it
            box["error"] = e

    t = threading.Thread(target=target, name="tunepipe-launch", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)  # short waits: a signal handler runs in the main thread between them
    if "error" in box:
        raise box["error"]
    return box["failures"]


def _read_results(job_dir: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for f in job_dir.glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            out[int(f.stem.removeprefix("rank"))] = json.loads(f.read_text())
    return out


def _describe_exit(failure: Any) -> str:
    code = getattr(failure, "exitcode", None)
    if isinstance(code, int) and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _outcome(
    name: str, results: dict[int, dict[str, Any]], failures: dict[int, Any], run_dir: Path
) -> StageResult:
    """The stage's result from the ranks' outcome files, or the exception the controller raises."""
    ranks = sorted(results)
    # A process that died without writing its outcome (killed, segfault, the OOM killer) is the cause;
    # the others failed because of it (gloo: "Connection closed by peer").
    died = [r for r in failures if r not in results]
    if died:
        first_failed = min(died, key=lambda r: getattr(failures[r], "timestamp", 0))
        failure = failures[first_failed]
        log = run_dir / "logs" / (f"{name}.log" if first_failed == 0 else f"{name}.rank{first_failed}.log")
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise WorkerFailed(
            f"[{name}] process rank {first_failed} (pid {getattr(failure, 'pid', '?')}) died: "
            f"{_describe_exit(failure)}; the other processes were stopped. Its log: {log}. "
            "Run the same command again to resume from the last complete checkpoint",
            tail,
        )
    if not results:
        raise WorkerFailed(f"[{name}] the launched processes wrote no result")
    # A cause reported by a process wins over "done" elsewhere. Among errors the first in time is the
    # cause (the others are its peers losing their connection to it); rank order breaks ties.
    order = {"bad_input": 0, "error": 0, "gate": 2, "stopped": 3, "done": 4}
    rank = min(
        ranks,
        key=lambda r: (order.get(results[r].get("kind", "error"), 0), results[r].get("time", 0), r),
    )
    r = results[rank]
    kind, message = r.get("kind"), r.get("message", "")
    if kind == "done":
        res = results.get(0, r)
        return StageResult(
            summary=res["summary"], gates=[Gate(**g) for g in res["gates"]], outputs=res["outputs"]
        )
    if kind == "stopped":
        raise StageStopped(message)
    if kind == "gate":
        raise GateFailed(message)
    if kind == "bad_input":
        raise LaunchError(message)
    raise WorkerFailed(f"[{name}] rank {rank}: {r.get('type', 'Error')}: {message}", r.get("traceback", ""))


# --------------------------------------------------------------------------- other nodes


def _control_store(topo: Topology, leader: bool) -> Any:
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(
        topo.master_addr,
        topo.master_port + 1,
        world_size=None,
        is_master=leader,
        timeout=timedelta(seconds=CONNECT_TIMEOUT_S),  # a follower started before node 0 waits this long
        wait_for_workers=False,
    )
    store.set_timeout(timedelta(seconds=FOLLOW_TIMEOUT_S))  # node 0 may prepare data for hours
    return store


def follow(cfg: Config, run_dir: Path, topo: Topology, echo: Callable[[str], None]) -> dict[str, str]:
    """Node 1..N-1: join each process group node 0 launches, until it says the run is over. Checks
    first that this node sees node 0's run folder (a shared filesystem)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    _quiet_elastic()
    echo(f"node {topo.node_rank} of {topo.nodes}: following node 0 at {topo.master_addr}:{topo.master_port}")
    store = _control_store(topo, leader=False)
    token = store.get("tunepipe/token").decode()
    outcome: dict[str, str] = {}
    seq = 0
    while True:
        msg = json.loads(store.get(f"tunepipe/job/{seq}").decode())
        seq += 1
        if msg.get("end"):
            if not msg.get("ok"):
                raise WorkerFailed(f"node 0 stopped the run: {msg.get('error') or 'see its output'}")
            return outcome
        # This node's view of the run folder: on a shared filesystem, the file node 0 just wrote.
        job_path = run_dir / ".launch" / msg["stage"] / "job.json"
        try:
            seen = json.loads(job_path.read_text()).get("token")
        except (OSError, ValueError):
            seen = None
        problem = None
        if seen != token:
            problem = (
                f"node {topo.node_rank} cannot see node 0's run folder {run_dir} (no {job_path} with this "
                "run's token): project.output_dir must be on a filesystem every node mounts at the same path"
            )
            # Join the group anyway, so that every process (node 0's too) stops with this message
            # instead of waiting for this node until the rendezvous times out.
            job_path = Path(tempfile.mkdtemp(prefix="tunepipe-job-")) / "job.json"
            job_path.write_text(
                json.dumps({"stage": msg["stage"], "run_dir": str(job_path.parent), "problem": problem})
            )
        config = LaunchConfig(
            min_nodes=topo.nodes,
            max_nodes=topo.nodes,
            nproc_per_node=topo.processes,
            run_id=f"tunepipe-{msg['stage']}-{msg['seq']}-{token}",
            rdzv_backend="static",
            rdzv_endpoint=f"{topo.master_addr}:{msg['port']}",
            rdzv_configs={"rank": topo.node_rank, "timeout": 900},
            max_restarts=0,
            monitor_interval=0.5,
            start_method="spawn",
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        failures = _launch_in_thread(config, job_path, elastic_launch, ChildFailedError)
        if problem:
            raise LaunchError(problem)
        outcome[msg["stage"]] = "failed" if failures else "done"


# --------------------------------------------------------------------------- worker side


def _visible_run_folder(job: dict[str, Any]) -> None:
    """Every process reads the job from the run folder: one that sees another folder (a node without
    the shared filesystem) is stopped here, before any model is loaded."""
    from .dist import all_gather_objects

    seen = all_gather_objects((job.get("token"), job.get("problem")))
    if len({token for token, _ in seen}) > 1:
        problems = [problem for _, problem in seen if problem]
        raise LaunchError(
            problems[0]
            if problems
            else f"the processes read different run folders ({job['run_dir']}): project.output_dir must "
            "be on a filesystem every node mounts at the same path"
        )


def worker(job_path: Path) -> int:
    """One launched process: run the stage, write this rank's outcome, return the exit code."""
    from .dist import ensure_process_group, rank
    from .pipeline import StageLog, spec_of
    from .training import OutOfMemory

    job = json.loads(job_path.read_text())
    name, run_dir, me = job["stage"], Path(job["run_dir"]), rank()
    out = job_path.parent / f"rank{me}.json"
    log = StageLog(run_dir, print)
    log.open(name)
    code = 0
    try:
        from .config import load_config

        # The group the launcher set up the environment for (NCCL on GPUs, gloo on CPU); the
        # trainers (accelerate) use an initialized group as it is.
        if ensure_process_group():
            _visible_run_folder(job)
        cfg = load_config(job["config"], job["overrides"])
        ctx = StageContext(
            cfg=cfg,
            run_dir=run_dir,
            smoke=job["smoke"],
            log=log,
            fingerprint=job["fingerprint"],
            deadline=job["deadline"],
            verbose=job["verbose"],
            budget_end=job["budget_end"],
            micro_batch=tuple(job["micro_batch"]) if job["micro_batch"] else None,
            batch_changes=list(job["batch_changes"]),
            stop_file=Path(job["stop_file"]),
        )
        import importlib

        from .console import capture_library_output

        module = importlib.import_module(spec_of(name).module)
        # Imported before the capture, which switches off the progress bars of the libraries loaded.
        import datasets  # noqa: F401
        import transformers  # noqa: F401

        with capture_library_output(log.file, verbose=ctx.verbose):
            result: StageResult = module.run(ctx)
        record: dict[str, Any] = {
            "kind": "done",
            "summary": result.summary,
            "gates": [asdict(g) for g in result.gates],
            "outputs": json.loads(json.dumps(result.outputs, default=str)),
        }
    except StageStopped as e:
        record = {"kind": "stopped", "message": str(e)}
    except KeyboardInterrupt:  # Ctrl-C reached the workers too, outside a training step
        record = {"kind": "stopped", "message": f"[{name}] interrupted; run the same command again"}
    except GateFailed as e:
        record, code = {"kind": "gate", "message": str(e)}, 3
    except GroupOutOfMemory as e:
        record = {"kind": "oom", "where": e.where, "batch": e.batch, "accum": e.accum}
        code = EXIT_GROUP_OOM
    except BaseException as e:
        from .pipeline import _is_bad_input

        tb = traceback.format_exc()
        if log.file:
            log.file.write(tb)
        # OutOfMemory (even micro-batch 1 did not fit) is an error with the plan in its message.
        bad = _is_bad_input(e) and not isinstance(e, OutOfMemory)
        record = {
            "kind": "bad_input" if bad else "error",
            "type": type(e).__name__,
            "message": str(e),
            "traceback": tb,
        }
        code = 2 if record["kind"] == "bad_input" else 1
    record["rank"] = me
    record["time"] = time.time()
    write_atomic(out, json.dumps(record, indent=2, default=str))
    log.close()
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return code


@contextlib.contextmanager
def maybe_group(
    cfg: Config, topo: Topology | None, run_dir: Path, echo: Callable[[str], None]
) -> Iterator[Group | None]:
    """The controller's Group when this run launches processes, else None (one process, in-process).
    TUNEPIPE_LAUNCH=always launches a group of one too (the GPU check runs the launch path so)."""
    if topo is None or (topo.world <= 1 and os.environ.get("TUNEPIPE_LAUNCH") != "always"):
        yield None
        return
    with Group(cfg, topo, run_dir, echo) as group:
        yield group


if __name__ == "__main__":
    # Run as `python -m tunepipe.launch`: call the worker of the imported module, whose exception
    # classes (GroupOutOfMemory) are the ones training.py raises, not this __main__ copy's.
    from tunepipe.launch import worker as _worker

    sys.exit(_worker(Path(sys.argv[1])))
