"""`tunepipe ui` in a real headless Chromium (Debian's `chromium`, driven by Playwright): start a run
from the page, watch its loss curve gain points live, stop it (exit 75, a complete checkpoint), resume
it to the end, chat with the trained stage. The real `tunepipe ui` command serves it; the run is the
real `tunepipe run` it starts. A screenshot of the run page is kept in test-artifacts/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tunepipe, write_config, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None  # type: ignore[assignment]

ARTIFACTS = Path(os.environ.get("TUNEPIPE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (.ci/run installs Debian chromium)"
)
@pytest.mark.skipif(sync_playwright is None, reason="playwright not installed (pip install -e '.[dev]')")
def test_dashboard_live_curves_stop_resume_and_chat(tmp_path: Path, tiny_qwen3: Path) -> None:
    cfg_path = write_config(
        tmp_path, tiny_qwen3, sft={"max_steps": 24, "method": "full", "learning_rate": 3e-3}
    )
    # One answer to every question: the tiny random model learns it in 24 steps, so the chat reply
    # compared below is real text, not an immediate end-of-turn.
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": "The answer is forty two."},
            ]
        }
        for i in range(24)
    ]
    write_jsonl(tmp_path / "data" / "const.jsonl", rows)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["pipeline"] = ["sft"]
    raw["data"]["sft"] = {"train": "data/const.jsonl", "eval": "data/const.jsonl"}
    raw["sft"].pop("lora")
    raw["training"] = {"save_steps": 4}
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    # Each SFT step takes >= 0.6 s (a long training on a tiny model), so the page sees it live.
    env = {**os.environ, "TUNEPIPE_FAULT": "slow_step:sft:600", "NO_COLOR": "1"}
    ui = subprocess.Popen(
        [sys.executable, "-m", "tunepipe", "ui", "runs", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir = tmp_path / "runs" / "test"
    try:
        line = ui.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("tunepipe ui: http://127.0.0.1:"), line
        url = line.split()[2]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            # Start from the form: a misspelt override is shown next to it, then the fixed one starts.
            page.goto(url + "#/new")
            page.fill("#cfg-path", "tunepipe.yaml")
            page.fill("#cfg-overrides", "sft.learning_rat=3e-3")
            page.click("#btn-validate")
            expect(page.locator("#err-overrides .field-error")).to_contain_text(
                "did you mean 'sft.learning_rate'"
            )
            page.fill("#cfg-overrides", "sft.learning_rate=3e-3")
            page.click("#btn-start")
            page.wait_for_url("**/#/run/test")
            loaded_at = page.evaluate("window.tunepipeLoadedAt")

            # Live: the loss curve gains points while the page stays as it is.
            loss = page.locator("svg.chart[data-stage=sft][data-key=loss]")
            page.wait_for_function(
                "() => Number(document.querySelector('svg.chart[data-key=loss]')?.dataset.points) >= 2",
                timeout=90_000,
            )
            first = int(loss.get_attribute("data-points") or 0)
            page.wait_for_function(
                f"() => Number(document.querySelector('svg.chart[data-key=loss]').dataset.points) > {first}",
                timeout=10_000,
            )
            assert page.evaluate("window.tunepipeLoadedAt") == loaded_at  # no reload
            expect(page.locator("#run-status")).to_have_text("running")

            # Stop from the page: SIGTERM, the stage saves a checkpoint and the run exits 75.
            page.wait_for_function(
                "() => Number(document.querySelector('svg.chart[data-key=loss]').dataset.points) >= 5",
                timeout=30_000,
            )
            page.click("#btn-stop")
            expect(page.locator("#run-status")).to_have_text("stopped", timeout=60_000)
            expect(page.locator("#timeline [data-stage=sft]")).to_have_attribute("data-status", "stopped")
            out = (tmp_path / "runs" / ".tunepipe-ui" / "test.out").read_text()
            assert "[tunepipe ui] exit code 75" in out, out[-2000:]
            state = json.loads((run_dir / "pipeline.json").read_text())
            assert state["stages"]["sft"]["status"] == "stopped"
            done_steps = [p for p in (run_dir / "sft" / "checkpoints").glob("checkpoint-*")]
            assert done_steps and all((p / "tunepipe-complete.json").is_file() for p in done_steps)
            stopped_at = max(
                json.loads(x)["step"] for x in (run_dir / "sft" / "log.jsonl").read_text().splitlines()
            )
            assert stopped_at < 24

            # Resume from the page: the same command again, to the end.
            page.click("#btn-resume")
            expect(page.locator("#run-status")).to_have_text("running", timeout=30_000)
            expect(page.locator("#run-status")).to_have_text("done", timeout=240_000)
            expect(page.locator("#timeline [data-stage=report]")).to_have_attribute("data-status", "done")
            steps = [json.loads(x)["step"] for x in (run_dir / "sft" / "log.jsonl").read_text().splitlines()]
            assert steps == list(range(1, 25))  # resumed where it stopped: every step once
            expect(page.locator("svg.chart[data-key=loss]")).to_have_attribute("data-points", "24")
            assert "resuming from checkpoint-" in (run_dir / "logs" / "sft.log").read_text()
            expect(page.locator("#metrics table")).to_contain_text("Δ sft−base")
            expect(page.frame_locator("iframe.report").locator("h1")).to_contain_text("fine-tuning report")

            # Chat with the trained stage: streamed, and the same greedy reply as `tunepipe chat`.
            prompt = "What is 12 + 30?"
            page.select_option("#chat-stage", "sft")
            page.fill("#chat-input", prompt)
            page.click("#chat-send")
            reply = page.locator("#chat-log .msg.assistant[data-done='1'] .text")
            expect(reply).to_have_count(1, timeout=120_000)
            shown = reply.inner_text()
            streamed = int(page.locator("#chat-log .msg.assistant").get_attribute("data-streamed") or 0)
            cli = tunepipe("chat", cfg_path, "sft.learning_rate=3e-3", "--stage", "sft", "--prompt", prompt)
            assert cli.returncode == 0, cli.stderr
            assert shown.strip() == cli.stdout.strip() and shown.strip(), (shown, cli.stdout)
            assert streamed > 1  # tokens arrived as they were generated, not as one block

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "ui-run-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            assert not errors, errors
            browser.close()
    finally:
        ui.terminate()
        ui.wait(10)
