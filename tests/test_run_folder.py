"""The run folder keeps its promises under bad inputs and faults, through the real CLI: inputs are never
written to, one writer at a time, state files that cannot be read don't block the folder, a full disk
or a missing model is exit 2 naming the file and the fix, and secrets never reach the folder."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tunepipe, write_config, write_jsonl

from tunepipe.training import loss_gate


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]


# --------------------------------------------------------------------------- inputs are never written to


def test_an_output_folder_holding_the_sources_is_refused_before_anything_runs(
    tmp_path: Path, tiny_qwen3: Path
):
    """`project.output_dir: .` with the sources in data/ under the names of the prepared splits (the
    names `tunepipe init` gives its samples): the data stage would overwrite them."""
    alpaca = [{"id": i, "instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(12)]
    write_jsonl(tmp_path / "data" / "sft_train.jsonl", alpaca)
    pairs = [{"prompt": f"Pick {i}", "chosen": "yes", "rejected": "no"} for i in range(6)]
    write_jsonl(tmp_path / "data" / "dpo_train.jsonl", pairs)
    cfg = {
        "project": {"name": "inplace", "output_dir": "."},
        "model": {"name_or_path": str(tiny_qwen3)},
        "data": {"sft": {"train": "data/sft_train.jsonl"}, "dpo": {"train": "data/dpo_train.jsonl"}},
    }
    path = tmp_path / "tunepipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = _digest(tmp_path / "data")
    for command in ("run", "data"):
        proc = tunepipe(command, path)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        _no_traceback(proc)
        assert "preflight" in proc.stderr and "data.sft.train" in proc.stderr
        assert "overlaps the run folder's data" in proc.stderr
        assert "set project.output_dir" in proc.stderr and "runs/inplace" in proc.stderr
        assert "[data] running" not in proc.stdout
    assert _digest(tmp_path / "data") == before  # byte-identical, nothing added
    assert not (tmp_path / "pipeline.json").exists()


# --------------------------------------------------------------------------- one writer per run folder


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_second_run_on_a_busy_folder_exits_2_naming_the_first_ones_pid(tmp_path: Path, tiny_qwen3: Path):
    secret_goal = "reach hf_abcdefghijklmnopqrstuvwxyz0123 on the support set"
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        project={"name": "lock", "output_dir": "runs/lock", "goal": secret_goal},
        training={"logging_steps": 1, "save_steps": 4},
        sft={"max_steps": 8},
        dpo={"enabled": False},
        eval={"models": ["base", "sft"], "max_new_tokens": 5},
    )
    run = tmp_path / "runs" / "lock"
    env_secret = "wandb-key-0123456789abcdef0123456789"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "NO_COLOR": "1",
        "TUNEPIPE_FAULT": "slow_step:sft:400",
        "WANDB_API_KEY": env_secret,
    }
    out_file, err_file = (tmp_path / "first.out").open("w"), (tmp_path / "first.err").open("w")
    first = subprocess.Popen(  # output to files: a full pipe would block it while the test waits
        [sys.executable, "-m", "tunepipe", "run", str(cfg)], env=env, stdout=out_file, stderr=err_file
    )
    lock = run / ".tunepipe.lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        if lock.is_file() and lock.read_text().strip() and json.loads(lock.read_text())["pid"] == first.pid:
            break
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before the second could start"
    second = tunepipe("run", cfg)
    first.wait(timeout=600)
    out_file.close(), err_file.close()
    out, err = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    _no_traceback(second)
    assert f"PID {first.pid}" in second.stderr and "in use by another tunepipe process" in second.stderr
    assert first.returncode == 0, out[-3000:] + err[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "sft" / "log.jsonl").read_text().splitlines() if x]
    assert steps == list(range(1, 9))
    gates = json.loads((run / "sft" / "stage.json").read_text())["gates"]
    assert any(g["detail"] == "8 logged steps" for g in gates)
    # The lock is gone with its process: the next run starts (and skips what is done).
    again = tunepipe("run", cfg)
    assert again.returncode == 0 and again.stdout.count("skipped (up to date)") == 4, again.stderr
    # Secrets: neither the token-looking goal nor the environment's key reach any file of the run.
    for f in run.rglob("*"):
        if f.is_file():
            text = f.read_bytes().decode("utf-8", "replace")
            assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in text, f
            assert env_secret not in text, f
    report = (run / "report" / "report.md").read_text()
    assert "reach *** on the support set" in report
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert resolved["eval"]["max_new_tokens"] == 5  # a harmless key with "token" in its name stays


# --------------------------------------------------------------------------- state files


@pytest.mark.slow
def test_an_empty_or_invalid_pipeline_json_is_set_aside_and_rebuilt(tmp_path: Path, tiny_qwen3: Path):
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        project={"name": "state", "output_dir": "runs/state"},
        sft={"max_steps": 2},
        dpo={"enabled": False},
        eval={"models": ["base", "sft"], "max_new_tokens": 4},
    )
    run = tmp_path / "runs" / "state"
    first = tunepipe("run", cfg)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (run / "pipeline.json").write_bytes(b"")  # what a full disk leaves
    proc = tunepipe("run", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    _no_traceback(proc)
    assert f"{run / 'pipeline.json'} was unreadable (empty)" in proc.stdout
    assert proc.stdout.count("skipped (up to date)") == 4  # rebuilt from each stage's stage.json
    assert len(list(run.glob("pipeline.json.corrupt-*"))) == 1
    assert json.loads((run / "pipeline.json").read_text())["stages"]["sft"]["status"] == "done"
    time.sleep(1)  # the set-aside copy is named by the second
    (run / "pipeline.json").write_text('{"stages": {"data": ')
    forced = tunepipe("run", cfg, "--force")
    assert forced.returncode == 0, forced.stdout[-2000:] + forced.stderr[-2000:]
    assert "was unreadable (Expecting value" in forced.stdout and "[sft] running" in forced.stdout
    assert len(list(run.glob("pipeline.json.corrupt-*"))) == 2
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- preflight


def test_preflight_names_a_missing_model_folder_and_a_missing_package(tmp_path: Path, tiny_qwen3: Path):
    cfg = write_config(tmp_path, tiny_qwen3, project={"name": "pf", "output_dir": "runs/pf"})
    started = time.time()
    proc = tunepipe("run", cfg, "model.name_or_path=./models/nope")
    assert proc.returncode == 2 and time.time() - started < 60
    _no_traceback(proc)
    assert "model.name_or_path: './models/nope' is not a folder" in proc.stderr
    assert "does not exist" in proc.stderr and "fix model.name_or_path" in proc.stderr
    assert not (tmp_path / "runs" / "pf" / "data").exists()  # nothing ran
    # A package the eval stage needs, missing. Stand-in for an uninstalled lm-eval: the subprocess
    # marks the module absent (sys.modules[name] = None), the way Python reports a missing package.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['lm_eval'] = None\n")
    lm = tunepipe(
        "run",
        cfg,
        "eval.lm_eval.tasks=[arc_easy]",
        env={"PYTHONPATH": f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert lm.returncode == 2, lm.stdout[-2000:] + lm.stderr[-2000:]
    assert "eval.lm_eval needs lm_eval, which is not installed" in lm.stderr
    assert "pip install -e '.[eval]'" in lm.stderr and "[data] running" not in lm.stdout


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_exit_2_naming_the_file_and_leaves_no_partial_file(tmp_path: Path, tiny_qwen3: Path):
    """Stand-in for a full disk: RLIMIT_FSIZE makes writes past a size fail with EFBIG, as ENOSPC
    would (Python ignores SIGXFSZ). Filling a real disk is not possible on a shared machine."""
    cfg = write_config(tmp_path, tiny_qwen3, project={"name": "full", "output_dir": "runs/full"})
    run = tmp_path / "runs" / "full"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "tunepipe", "data", str(cfg)]
    # 1 KiB: the preflight's probe write fails, nothing starts.
    tiny = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=_limit_file_size(1024))
    assert tiny.returncode == 2, tiny.stdout[-2000:] + tiny.stderr[-2000:]
    _no_traceback(tiny)
    assert "project.output_dir" in tiny.stderr and "cannot be written: File too large" in tiny.stderr
    # 16 KiB: the preflight passes, the prepared split does not fit.
    mid = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=_limit_file_size(16384))
    assert mid.returncode == 2, mid.stdout[-2000:] + mid.stderr[-2000:]
    _no_traceback(mid)
    assert "cannot write" in mid.stderr and "File too large" in mid.stderr and str(run) in mid.stderr
    state = json.loads((run / "pipeline.json").read_text())
    assert state["stages"]["data"]["status"] == "failed"  # not left "running"
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]


# --------------------------------------------------------------------------- the loss gate


def test_the_loss_falling_gate_is_not_judged_on_a_handful_of_steps() -> None:
    rising = [{"loss": x} for x in (1.0, 1.1, 1.05, 1.2, 1.15, 1.3)]
    auto = {g.name: g for g in loss_gate(rising, "auto")}
    assert auto["loss_falling"].passed and "not checked: 6 logged steps < 10" in auto["loss_falling"].detail
    forced = {g.name: g for g in loss_gate(rising, True)}
    assert not forced["loss_falling"].passed and "loss_falling_gate: false" in forced["loss_falling"].detail
    assert "loss_falling" not in {g.name for g in loss_gate(rising * 3, False)}
    falling = [{"loss": 2.0 - i * 0.1} for i in range(12)]
    assert all(g.passed for g in loss_gate(falling, "auto"))
    assert not {g.name: g for g in loss_gate(rising * 2, "auto")}["loss_falling"].passed


@pytest.mark.slow
def test_short_runs_pass_the_gate_through_the_cli(tmp_path: Path, tiny_qwen3: Path):
    cfg = write_config(
        tmp_path, tiny_qwen3, project={"name": "short", "output_dir": "runs/short"}, dpo={"max_steps": 2}
    )
    assert tunepipe("data", cfg).returncode == 0
    for stage, steps in (("sft", 6), ("dpo", 2)):
        proc = tunepipe("train", cfg, "--stage", stage, f"{stage}.max_steps={steps}", "sft.max_steps=6")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"gate loss_falling: passed (not checked: {steps} logged steps < 10" in proc.stdout


# --------------------------------------------------------------------------- smaller cases


def test_config_mistakes_name_the_line_and_the_key(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "a.yaml"
    bad_yaml.write_text('project:\n  name: x\n  goal "oops"\nsft:\n  learning_rate: 1e-4\n')
    proc = tunepipe("run", bad_yaml)
    assert proc.returncode == 2 and f"{bad_yaml}:3: not valid YAML" in proc.stderr
    assert '3 |   goal "oops"' in proc.stderr
    names = tmp_path / "b.yaml"
    names.write_text("eval:\n  sets:\n    - {name: ../escape, source: sft_eval}\n")
    proc = tunepipe("run", names)
    assert proc.returncode == 2 and "eval set name '../escape'" in proc.stderr and "no '/'" in proc.stderr
    _no_traceback(proc)


def test_report_compare_sees_a_difference_in_a_key_named_like_a_token(tmp_path: Path) -> None:
    from tunepipe.config import dump_resolved, load_config

    runs = []
    for n in (32, 64):
        run = tmp_path / f"run-{n}"
        run.mkdir()
        (run / "pipeline.json").write_text(json.dumps({"stages": {}}))
        (run / "config.resolved.yaml").write_text(
            dump_resolved(load_config(None, [f"eval.max_new_tokens={n}"]))
        )
        runs.append(run)
    proc = tunepipe("report", "--compare", *runs, "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    assert "| eval.max_new_tokens | 32 | 64 |" in (tmp_path / "cmp" / "compare.md").read_text()


@pytest.mark.slow
def test_an_unexpected_error_names_the_real_log_and_chat_takes_overrides(tmp_path: Path, tiny_qwen3: Path):
    (tmp_path / "scorers.py").write_text(
        "def boom(prediction, reference):\n    raise RuntimeError('scorer bug')\n"
    )
    write_jsonl(
        tmp_path / "qa.jsonl",
        [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}],
    )
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        project={"name": "boom", "output_dir": "runs/boom"},
        sft={"enabled": False},
        dpo={"enabled": False},
        eval={
            "models": ["base"],
            "sets": [{"name": "qa", "source": "qa.jsonl", "metrics": ["scorers:boom"]}],
        },
    )
    proc = tunepipe("run", cfg)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = tmp_path / "runs" / "boom" / "logs" / "eval.log"
    assert f"the full traceback is in {log}" in proc.stderr and "<output_dir>" not in proc.stderr
    assert "RuntimeError: scorer bug" in log.read_text()
    chat = tunepipe(
        "chat", cfg, "--stage", "base", "--prompt", "hi", "--max-new-tokens", "3", "eval.batch_size=2"
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    bad = tunepipe("chat", cfg, "--stage", "base", "--prompt", "hi", "sft.learning_rat=1")
    assert bad.returncode == 2 and "did you mean 'sft.learning_rate'" in bad.stderr
