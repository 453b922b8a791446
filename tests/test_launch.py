"""`tunepipe run` launching its own process groups: 2 CPU processes over gloo stand in for 2 GPUs.

The topology tests read no processes; the others launch real process groups through torch's elastic
launcher, kill real processes and send real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config

from tunepipe.config import load_config
from tunepipe.launch import LaunchError, in_process_group, slurm_hosts, topology

TUNEPIPE = [sys.executable, "-m", "tunepipe"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def _tp(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TUNEPIPE, *args], capture_output=True, text=True, env=env or _env(), timeout=timeout
    )


def _log(run: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (run / stage / "log.jsonl").read_text().splitlines() if x.strip()]


# --------------------------------------------------------------------------- topology (no processes)


def test_topology_from_config_env_and_slurm(tmp_path: Path) -> None:
    cfg = load_config(None, ["hardware.processes=2"])
    t = topology(cfg, env={"CUDA_VISIBLE_DEVICES": ""})
    assert (t.processes, t.nodes, t.node_rank, t.master_addr, t.world) == (2, 1, 0, "127.0.0.1", 2)
    # No GPU and no hardware.processes: one process, nothing is launched.
    assert topology(load_config(None), env={"CUDA_VISIBLE_DEVICES": ""}).world == 1

    two = load_config(None, ["hardware.processes=4", "hardware.nodes=2"])
    t = topology(two, env={"CUDA_VISIBLE_DEVICES": "", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5"})
    assert (t.node_rank, t.master_addr, t.master_port, t.world) == (1, "10.0.0.5", 29500, 8)
    # The command line wins over the variables.
    t = topology(
        two, 0, "head", 31000, env={"CUDA_VISIBLE_DEVICES": "", "NODE_RANK": "1", "MASTER_ADDR": "x"}
    )
    assert (t.node_rank, t.master_addr, t.master_port) == (0, "head", 31000)

    slurm = {
        "CUDA_VISIBLE_DEVICES": "",
        "SLURM_JOB_ID": "77",
        "SLURM_NNODES": "3",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[07-09]",
    }
    t = topology(load_config(None, ["hardware.processes=4"]), env=slurm)
    assert (t.nodes, t.node_rank, t.master_addr, t.world) == (3, 2, "gpu07", 12)

    with pytest.raises(LaunchError, match="--master-addr"):
        topology(two, env={"CUDA_VISIBLE_DEVICES": ""})  # two nodes, nobody said where node 0 is
    with pytest.raises(LaunchError, match="node rank 2 is outside hardware.nodes 2"):
        topology(two, 2, "head", env={"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(LaunchError, match="WORLD_SIZE=3"):
        topology(cfg, env={"CUDA_VISIBLE_DEVICES": "", "WORLD_SIZE": "3"})
    with pytest.raises(LaunchError, match="SLURM_NNODES"):
        topology(load_config(None, ["hardware.nodes=2"]), env=slurm)


def test_slurm_nodelist_and_launched_detection() -> None:
    assert slurm_hosts("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert slurm_hosts("node5") == ["node5"]
    assert in_process_group({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert not in_process_group({"WORLD_SIZE": "2"})  # a user's variable, no launcher


# --------------------------------------------------------------------------- real process groups


@pytest.fixture
def project(tmp_path: Path, tiny_qwen3: Path) -> Path:
    return write_config(tmp_path, tiny_qwen3)


@pytest.mark.multiproc
@pytest.mark.slow
def test_run_two_processes_every_stage_and_eval_equals_one_process(project: Path) -> None:
    r = _tp("run", str(project), "--smoke", "hardware.processes=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = project.parent / "runs" / "test-smoke"
    for stage in ("sft", "dpo"):
        out = json.loads((run / stage / "stage.json").read_text())
        assert out["status"] == "done" and out["outputs"]["world_size"] == 2
        assert [row["step"] for row in _log(run, stage)] == [1, 2, 3]  # one writer
    state = json.loads((run / "pipeline.json").read_text())["stages"]
    assert all(state[s]["status"] == "done" for s in ("data", "sft", "dpo", "eval", "report"))
    assert "launching 2 processes" in (run / "logs" / "sft.log").read_text()
    assert (run / "logs" / "eval.rank1.log").is_file()  # eval ran in both processes
    two = json.loads((run / "eval" / "metrics.json").read_text())
    samples2 = {f.name: f.read_text() for f in sorted((run / "eval" / "samples").glob("*.jsonl"))}

    # The same adapters evaluated by one process: the same numbers, the same greedy generations.
    r = _tp("eval", str(project), "--smoke")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one = json.loads((run / "eval" / "metrics.json").read_text())
    assert one.keys() == two.keys()
    for model, sets in one.items():
        for name, metrics in sets.items():
            for k, v in metrics.items():
                if isinstance(v, float):
                    assert two[model][name][k] == pytest.approx(v, abs=1e-5), (model, name, k)
                else:
                    assert two[model][name][k] == v, (model, name, k)
    assert {f.name: f.read_text() for f in sorted((run / "eval" / "samples").glob("*.jsonl"))} == samples2

    # Training and eval up to date: the second run launches nothing (the report, older than the
    # 1-process eval's metrics, is written again).
    r = _tp("run", str(project), "--smoke", "hardware.processes=2")
    assert r.returncode == 0 and r.stdout.count("skipped (up to date)") == 4, r.stdout
    assert "launching" not in r.stdout and "[report] done" in r.stdout


def _worker_pid(stage: str, rank: int) -> int | None:
    """The launched process of `stage` with this global rank, found by its environment."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        run_id = f"TORCHELASTIC_RUN_ID=tunepipe-{stage}-".encode()
        if (
            b"tunepipe.launch" in cmd
            and f"RANK={rank}".encode() in env
            and any(e.startswith(run_id) for e in env)
        ):
            return int(p.name)
    return None


def _wait_for_step(run: Path, stage: str, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()
        log = run / stage / "log.jsonl"
        if log.is_file() and any(r["step"] >= step for r in _log(run, stage)):
            return
        time.sleep(0.2)
    raise AssertionError(f"{stage} never logged step {step}")


TRAIN = ["sft.max_steps=12", "training.save_steps=2", "training.logging_steps=1", "hardware.processes=2"]


@pytest.mark.multiproc
@pytest.mark.slow
def test_sigterm_then_a_killed_rank_then_resume_equals_the_uninterrupted_run(project: Path) -> None:
    """SIGTERM to the launching command: every rank stops at one step, one complete checkpoint, exit 75.
    Resumed, then one rank killed with SIGKILL: the group stops within 60 s naming it. Resumed again:
    the per-step losses equal an uninterrupted 2-process run, no step logged twice."""
    slow = _env(TUNEPIPE_FAULT="slow_step:sft:300")
    for folder in ("runs/ref", "runs/test"):
        assert _tp("data", str(project), f"project.output_dir={folder}").returncode == 0
    ref = _tp("train", str(project), "--stage", "sft", *TRAIN, "project.output_dir=runs/ref", env=slow)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    run = project.parent / "runs" / "test"
    cmd = [*TUNEPIPE, "train", str(project), "--stage", "sft", *TRAIN]

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slow)
    _wait_for_step(run, "sft", 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-2000:] + err[-2000:]
    stopped_at = max(r["step"] for r in _log(run, "sft"))
    newest = sorted((run / "sft" / "checkpoints").glob("checkpoint-*"), key=lambda d: int(d.name[11:]))[-1]
    # The stop's checkpoint: at the step every rank stopped at, complete, with both ranks' RNG states.
    assert newest.name == f"checkpoint-{stopped_at}" and (newest / "tunepipe-complete.json").is_file()
    assert (newest / "rng_state_0.pth").is_file() and (newest / "rng_state_1.pth").is_file()

    assert stopped_at <= 9, "stopped too late to test a crash after the resume"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slow)
    _wait_for_step(run, "sft", stopped_at + 2, proc)
    pid = _worker_pid("sft", 1)
    assert pid, "rank 1 not found"
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None) and time.time() - killed < 60
    assert f"resuming from checkpoint-{stopped_at}" in out
    assert "rank 1" in err and "SIGKILL" in err, err[-2000:]

    again = _tp("train", str(project), "--stage", "sft", *TRAIN)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from checkpoint-" in again.stdout
    resumed, reference = _log(run, "sft"), _log(project.parent / "runs" / "ref", "sft")
    assert [r["step"] for r in resumed] == list(range(1, 13))  # no step logged twice
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference], abs=1e-4)


@pytest.mark.multiproc
@pytest.mark.slow
def test_out_of_memory_on_one_rank_halves_every_rank(project: Path, tmp_path: Path) -> None:
    assert _tp("data", str(project)).returncode == 0
    env = _env(TUNEPIPE_FAULT="oom:sft:2:1", TUNEPIPE_FAULT_STATE=str(tmp_path / "fired"))
    r = _tp("train", str(project), "--stage", "sft", "sft.max_steps=4", "hardware.processes=2", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads((project.parent / "runs" / "test" / "sft" / "stage.json").read_text())["outputs"]
    assert out["world_size"] == 2
    # micro-batch 2 x accumulation 1 -> 1 x 2 in both processes: the same effective batch.
    assert (out["per_device_train_batch_size"], out["gradient_accumulation_steps"]) == (1, 2)
    assert len(out["batch_changes"]) == 1 and "on rank 1" in out["batch_changes"][0]
    assert [r["step"] for r in _log(project.parent / "runs" / "test", "sft")] == [1, 2, 3, 4]


@pytest.mark.multiproc
@pytest.mark.slow
def test_nan_on_one_rank_stops_all_ranks_at_that_step(project: Path) -> None:
    assert _tp("data", str(project)).returncode == 0
    r = _tp(
        "train",
        str(project),
        "--stage",
        "sft",
        "sft.max_steps=6",
        "hardware.processes=2",
        env=_env(TUNEPIPE_FAULT="nan:sft:3:1"),
        timeout=300,
    )
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "loss is nan at step 3" in r.stderr


def _node(project: Path, rank: int, port: int, *extra: str) -> subprocess.Popen:
    cmd = [*TUNEPIPE, "train", str(project), "--stage", "sft", "--smoke", "hardware.nodes=2"]
    cmd += ["hardware.processes=1", *extra, "--node-rank", str(rank), "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_nodes_run_one_group_and_a_node_without_the_run_folder_is_named(project: Path) -> None:
    """Two "nodes" on this machine (one process each): the same command on both, node 0 controls."""
    from tunepipe.launch import free_port

    assert _tp("data", str(project), "--smoke").returncode == 0
    port = free_port()
    leader, follower = _node(project, 0, port), _node(project, 1, port)
    out0, err0 = leader.communicate(timeout=600)
    out1, err1 = follower.communicate(timeout=120)
    assert leader.returncode == 0, out0[-2000:] + err0[-2000:]
    assert follower.returncode == 0, out1[-2000:] + err1[-2000:]
    stage = json.loads((project.parent / "runs" / "test-smoke" / "sft" / "stage.json").read_text())
    assert stage["outputs"]["world_size"] == 2
    assert "node 1 of 2: following node 0" in out1

    # Node 1 looks at another folder (no shared filesystem): both stop at once, naming the problem.
    port = free_port()
    leader = _node(project, 0, port)  # a named stage always runs again
    follower = _node(project, 1, port, "project.output_dir=runs/elsewhere")
    out0, err0 = leader.communicate(timeout=300)
    out1, err1 = follower.communicate(timeout=120)
    assert follower.returncode == 2 and "node 1 cannot see node 0's run folder" in err1, err1[-2000:]
    assert leader.returncode == 2 and "node 1 cannot see node 0's run folder" in err0, err0[-2000:]


@pytest.mark.multiproc
@pytest.mark.slow
def test_fsdp_through_tunepipe_run_shards_and_saves_the_adapter(project: Path) -> None:
    """hardware.sharding: fsdp on 2 CPU processes: FSDP2 really wraps the model (accelerate alone
    would train DDP on CPU), and the final save gathers the sharded adapter on every rank."""
    from safetensors.torch import load_file

    assert _tp("data", str(project), "--smoke").returncode == 0
    r = _tp(
        "train", str(project), "--stage", "sft", "--smoke", "hardware.processes=2", "hardware.sharding=fsdp"
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = project.parent / "runs" / "test-smoke"
    assert "sft: 2 processes, FSDP2" in (run / "logs" / "sft.log").read_text()
    b = [
        t
        for k, t in load_file(str(run / "sft" / "adapter" / "adapter_model.safetensors")).items()
        if "lora_B" in k
    ]
    assert b and all(t.abs().sum() > 0 for t in b)
