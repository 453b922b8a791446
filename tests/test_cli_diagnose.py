"""`tunepipe diagnose` as a user runs it: a file or stdin, text or --json, exit 0 known / 1 unknown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tunepipe

FIXTURES = Path(__file__).parent / "fixtures" / "diagnose"


def test_diagnose_a_file_and_stdin() -> None:
    out = tunepipe("diagnose", FIXTURES / "pad-token-missing.log")
    assert out.returncode == 0, out.stderr
    assert "pad-token-missing" in out.stdout and "Where" in out.stdout and "Fix" in out.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "tunepipe", "diagnose", "-", "--json"],
        input=(FIXTURES / "cuda-oom-train.log").read_text(),
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
        timeout=120,
    )
    d = json.loads(proc.stdout)
    assert proc.returncode == 0 and d["id"] == "cuda-oom-train"
    assert {"id", "where", "cause", "fix", "confidence"} <= set(d) and d["fix"]


def test_unknown_error_still_says_where(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text(
        "Traceback (most recent call last):\n"
        '  File "/home/me/train.py", line 12, in <module>\n'
        "    main()\n"
        '  File "/usr/lib/python3.11/site-packages/foo/bar.py", line 3, in main\n'
        "    raise FrobnicationError('the widget is blue')\n"
        "foo.FrobnicationError: the widget is blue\n"
    )
    out = tunepipe("diagnose", log, "--json")
    d = json.loads(out.stdout)
    assert out.returncode == 1 and d["id"] is None and d["confidence"] == 0
    assert "train.py:12" in d["where"]["frame"] and "FrobnicationError" in d["where"]["exception"]
    missing = tunepipe("diagnose", tmp_path / "nope.log")
    assert missing.returncode == 2 and "no such file" in missing.stderr
