"""What GRPO adds on a verifiable skill: held-out numeric_match of the quickstart's SFT model against
the same model after examples/grpo.yaml (GRPO with numeric_match as the reward), per seed.

    python bench/grpo_gain.py [--seeds 0 1] [--out bench/results/grpo_gain.json]

Steps, all through the real CLI: the quickstart's data and sft stages (skipped when up to date),
`tunepipe export --stage sft` (the model examples/grpo.yaml starts from), then `tunepipe run
examples/grpo.yaml` once per seed into its own run folder. Run it alone: on 2 cores another job
beside it slows GRPO's sampling several times over. A measurement, not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
GRPO = ROOT / "examples" / "grpo.yaml"
SET, METRIC = "units3", "numeric_match"


def tunepipe(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "tunepipe", *args]
    print("+ tunepipe", " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grpo_gain.json")
    args = ap.parse_args()

    tunepipe("data", str(QUICKSTART))
    tunepipe("train", str(QUICKSTART), "--stage", "sft")
    tunepipe("export", str(QUICKSTART), "--stage", "sft")  # -> runs/quickstart/export-sft
    rows = []
    for seed in args.seeds:
        out_dir = f"../runs/grpo-seed{seed}"
        started = time.time()
        tunepipe("run", str(GRPO), f"training.seed={seed}", f"project.output_dir={out_dir}", "--force")
        run = (GRPO.parent / out_dir).resolve()
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        grpo = json.loads((run / "grpo" / "stage.json").read_text())
        sft_score, grpo_score = metrics["base"][SET][METRIC], metrics["grpo"][SET][METRIC]
        rows.append(
            {
                "seed": seed,
                "sft": sft_score,
                "grpo": grpo_score,
                "gain": round(grpo_score - sft_score, 4),
                "grpo_seconds": grpo["seconds"],
                "grpo_steps": grpo["outputs"]["steps"],
                "grpo_summary": grpo["summary"],
                "run_seconds": round(time.time() - started, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"set": SET, "metric": METRIC, "runs": rows}, indent=2) + "\n")
    print(f"\n| seed | SFT {METRIC} | GRPO {METRIC} | gain | GRPO time |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [str(r["seed"]), f"{r['sft']:.3f}", f"{r['grpo']:.3f}", f"{r['gain']:+.3f}"]
        print("| " + " | ".join([*cells, f"{r['grpo_seconds']:.0f} s"]) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
