"""Peak memory of one real training stage, for tests/test_planner.py (run as a subprocess).

    python tests/planner_measure.py CONFIG STAGE [KEY=VALUE ...]   # runs STAGE, prints JSON
    python tests/planner_measure.py --baseline                      # imports only, prints JSON

The stage runs through its own `run()` (the trainer, guards and saving of `tunepipe train`, without
the pipeline's up-to-date checks); the data stage must have written the run folder already. The last
line printed is JSON with the process's peak resident set size (VmHWM) in bytes: the number the
planner's CPU estimate is checked against. `--baseline` measures the same way after importing the
training stack only.
"""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["--baseline"]:
        from tunepipe.planner import import_training_stack, peak_rss_bytes

        import_training_stack()
        print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
        return 0
    config, stage, *overrides = argv
    from tunepipe.config import load_config
    from tunepipe.pipeline import run_dir_for
    from tunepipe.planner import peak_rss_bytes
    from tunepipe.stages import StageContext

    cfg = load_config(config, overrides)
    module = importlib.import_module(f"tunepipe.stages.{stage}")
    # The stage's own run(): the trainer, guards and saving of `tunepipe train`, without the pipeline's
    # up-to-date checks (the data stage must have run into the same run folder).
    result = module.run(StageContext(cfg=cfg, run_dir=run_dir_for(cfg, smoke=False), log=lambda _m: None))
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "steps": result.outputs.get("steps")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
