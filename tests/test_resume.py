"""Crash and resume: kill -9 at random training steps (one of them in the middle of a checkpoint
save), run again, and the per-step losses equal those of an uninterrupted run. Real subprocesses,
real SIGKILL, the tiny Qwen3 model on CPU."""

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

pytestmark = pytest.mark.slow

STEPS = 24


def _cmd(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tunepipe", *args[:1], str(cfg), *args[1:]]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "sft" / "log.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _last_step(run: Path) -> int:
    log = run / "sft" / "log.jsonl"
    if not log.is_file():
        return 0
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def _config(tmp_path: Path, model: Path, out: str) -> Path:
    return write_config(
        tmp_path,
        model,
        project={"name": "resume", "output_dir": out},
        training={"save_steps": 3, "save_total_limit": 2, "logging_steps": 1, "seed": 7},
        sft={"max_steps": STEPS, "learning_rate": 5e-3, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        dpo={"enabled": False},
        eval={"models": ["base", "sft"]},
    )


def test_kill_9_at_random_steps_then_resume_equals_an_uninterrupted_run(tmp_path: Path, tiny_qwen3: Path):
    ref_cfg = _config(tmp_path / "ref", tiny_qwen3, "runs/ref")
    assert subprocess.run(_cmd(ref_cfg, "data"), env=_env(), capture_output=True).returncode == 0
    r = subprocess.run(_cmd(ref_cfg, "train", "--stage", "sft"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    reference = _losses(tmp_path / "ref" / "runs" / "ref")
    assert sorted(reference) == list(range(1, STEPS + 1))

    cfg = _config(tmp_path / "crash", tiny_qwen3, "runs/crash")
    run = tmp_path / "crash" / "runs" / "crash"
    assert subprocess.run(_cmd(cfg, "data"), env=_env(), capture_output=True).returncode == 0
    # Four kills from outside at (roughly) these steps, and one from inside a checkpoint save at step 12:
    # its files are written but it is not marked complete, so the resume must not trust it.
    kills = [(4, None), (8, None), (13, "kill_in_save:sft:12"), (17, None), (22, None)]
    for at, fault in kills:
        env = _env(**({"TUNEPIPE_FAULT": fault} if fault else {}))
        proc = subprocess.Popen(
            _cmd(cfg, "train", "--stage", "sft"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while proc.poll() is None and _last_step(run) < at and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run meant to die near step {at} was not killed"
        if fault:
            partial = run / "sft" / "checkpoints" / "checkpoint-12"
            assert partial.is_dir() and not (partial / "tunepipe-complete.json").exists()
    done = subprocess.run(_cmd(cfg, "train", "--stage", "sft"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from checkpoint-" in done.stdout
    resumed = _losses(run)
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-4), f"step {step}"
    # Retention: the newest save_total_limit (2) complete checkpoints, plus the lowest-loss one.
    markers = {
        int(p.name.split("-")[1]): json.loads((p / "tunepipe-complete.json").read_text())["loss"]
        for p in (run / "sft" / "checkpoints").glob("checkpoint-*")
    }
    newest = sorted(markers)[-2:]
    assert newest == [STEPS - 3, STEPS]
    best_saved = min((s for s in range(3, STEPS + 1, 3)), key=lambda s: resumed[s])
    assert set(markers) == {*newest, best_saved}


def test_injected_oom_halves_the_micro_batch_and_doubles_accumulation(tmp_path: Path, tiny_qwen3: Path):
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        project={"name": "oom", "output_dir": "runs/oom"},
        training={"save_steps": 2, "logging_steps": 1},
        sft={"max_steps": 8, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
        dpo={"max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
    )
    # CPU has no out-of-memory error to provoke: the fault hook raises torch.OutOfMemoryError at the step.
    r = subprocess.run(
        _cmd(cfg, "run"), env=_env(TUNEPIPE_FAULT="oom:sft:5,oom:dpo:2"), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "out of memory at step 4: micro-batch 4 -> 2, gradient accumulation 1 -> 2" in r.stdout
    assert "out of memory at step 1: micro-batch 2 -> 1, gradient accumulation 2 -> 4" in r.stdout
    run = tmp_path / "runs" / "oom"
    sft = json.loads((run / "sft" / "stage.json").read_text())["outputs"]
    assert (sft["per_device_train_batch_size"], sft["gradient_accumulation_steps"], sft["steps"]) == (2, 2, 8)
    dpo = json.loads((run / "dpo" / "stage.json").read_text())["outputs"]
    assert (dpo["per_device_train_batch_size"], dpo["gradient_accumulation_steps"], dpo["steps"]) == (1, 4, 4)
    # Training went on from the checkpoint at step 4: every step logged once.
    assert sorted(_losses(run)) == list(range(1, 9))


def test_time_limit_stops_with_a_checkpoint_and_exit_75_then_a_second_run_finishes(
    tmp_path: Path, tiny_qwen3: Path
):
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        project={"name": "budget", "output_dir": "runs/budget"},
        hardware={"time_limit": "40s"},
        training={"save_steps": 1000, "logging_steps": 1},
        sft={"max_steps": 120},
        dpo={"enabled": False},
        eval={"models": ["base", "sft"]},
    )
    run = tmp_path / "runs" / "budget"
    # 250 ms per step: 120 steps need 30 s, more than the SFT share of a 40 s budget.
    env = _env(TUNEPIPE_FAULT="slow_step:sft:250")
    first = subprocess.run(_cmd(cfg, "run"), env=env, capture_output=True, text=True)
    assert first.returncode == 75, first.stdout[-3000:] + first.stderr[-3000:]
    state = json.loads((run / "pipeline.json").read_text())
    sft = state["stages"]["sft"]
    assert sft["status"] == "stopped" and sft["stopped_at"] < state["budget_end"]
    ckpts = [
        p
        for p in (run / "sft" / "checkpoints").glob("checkpoint-*")
        if (p / "tunepipe-complete.json").exists()
    ]
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 0 < stopped_at < 120 and max(_losses(run)) == stopped_at
    assert not (run / "sft" / "adapter").exists()  # no adapter from an unfinished stage

    # The budget is per invocation and not an input of any stage: a longer one for the second run
    # changes no fingerprint, so it resumes the stopped stage instead of starting over.
    second = subprocess.run(
        _cmd(cfg, "run", "hardware.time_limit=10m"), env=env, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from checkpoint-{stopped_at}" in second.stdout
    assert sorted(_losses(run)) == list(range(1, 121))
    assert (run / "report" / "report.md").is_file()
    # The stage's time is both segments: the stopped one counts too.
    resumed = json.loads((run / "pipeline.json").read_text())["stages"]["sft"]
    assert resumed["segments"] == 2 and resumed["seconds"] > sft["seconds"]
    stage_json = json.loads((run / "sft" / "stage.json").read_text())
    assert resumed["seconds"] > stage_json["seconds"]  # stage.json times the last segment only


def test_nan_loss_stops_in_its_step_names_it_and_keeps_the_last_checkpoint(tmp_path: Path, tiny_qwen3: Path):
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        project={"name": "nan", "output_dir": "runs/nan"},
        training={"save_steps": 2, "logging_steps": 1},
        sft={"max_steps": 8},
    )
    # A diverging run on a tiny model is not reproducible on every CPU: the hook makes step 5's loss NaN.
    r = subprocess.run(_cmd(cfg, "run"), env=_env(TUNEPIPE_FAULT="nan:sft:5"), capture_output=True, text=True)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "loss is nan at step 5" in r.stderr and "checkpoint-4" in r.stderr
    run = tmp_path / "runs" / "nan"
    assert max(_losses(run)) == 4  # nothing logged or applied from the bad step
    assert (run / "sft" / "checkpoints" / "checkpoint-4" / "tunepipe-complete.json").is_file()
    assert not (run / "sft" / "adapter").exists()
    state = json.loads((run / "pipeline.json").read_text())["stages"]
    assert state["sft"]["status"] == "failed" and "dpo" not in state or state["dpo"].get("status") != "done"


def test_sigterm_saves_a_checkpoint_exits_75_and_the_next_run_resumes(tmp_path: Path, tiny_qwen3: Path):
    cfg = _config(tmp_path, tiny_qwen3, "runs/term")
    run = tmp_path / "runs" / "term"
    env = _env(TUNEPIPE_FAULT="slow_step:sft:100")
    proc = subprocess.Popen(
        _cmd(cfg, "run"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while proc.poll() is None and _last_step(run) < 5 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "signal SIGTERM" in err
    marked = [
        p
        for p in (run / "sft" / "checkpoints").glob("checkpoint-*")
        if (p / "tunepipe-complete.json").exists()
    ]
    stopped = max(int(p.name.split("-")[1]) for p in marked)
    assert 5 <= stopped < STEPS and max(_losses(run)) == stopped
    again = subprocess.run(_cmd(cfg, "run"), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from checkpoint-{stopped}" in again.stdout
    assert sorted(_losses(run)) == list(range(1, STEPS + 1))


def test_a_checkpoint_at_the_last_step_is_final_no_extra_step(tmp_path: Path, tiny_qwen3: Path):
    """Stopped after the last checkpoint but before the stage finished (killed while saving the
    adapter, say): the rerun loads that checkpoint as the result. The trainer's own resume would run
    one step past max_steps before checking it."""
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        training={"save_steps": 2, "logging_steps": 1},
        sft={"max_steps": 4},
        dpo={"enabled": False},
    )
    run = tmp_path / "runs" / "test"
    for _ in range(2):  # the second `train --stage sft` reruns the named stage over checkpoint-4
        r = subprocess.run(_cmd(cfg, "data"), capture_output=True, text=True, env=_env())
        r = subprocess.run(_cmd(cfg, "train", "--stage", "sft"), capture_output=True, text=True, env=_env())
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "checkpoint-4 is the last step; training is done" in r.stdout
    assert list(_losses(run)) == [1, 2, 3, 4]
    out = json.loads((run / "sft" / "stage.json").read_text())["outputs"]
    assert out["steps"] == 4 and (run / "sft" / "adapter" / "adapter_model.safetensors").is_file()
