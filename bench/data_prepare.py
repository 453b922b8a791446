"""Benchmark: the data stage on 50k short chat rows, cold (empty cache) and warm (cache hit).

    make bench                      # or: .venv/bin/python bench/data_prepare.py [--rows 50000]

Target (issue 3): <= 60 s cold and <= 5 s warm on a 2-core machine. Uses the embedded model's
tokenizer (imported on first use) and writes everything under a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    from tunepipe.config import load_config
    from tunepipe.data.prepare import prepare, write_prepared
    from tunepipe.modeling import load_tokenizer
    from tunepipe.quickstart.skills import generate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        seed = 0
        while len(rows) < args.rows:  # distinct questions run out per seed: several seeds
            rows += generate(seed=seed, n_sft_train=2000, n_sft_eval=1, n_dpo_eval=1, n_dpo_train=1)[
                "sft_train"
            ]
            seed += 1
        rows = rows[: args.rows]
        (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / "cfg.yaml").write_text(
            f"model: {{name_or_path: {args.model}}}\ndpo: {{enabled: false}}\neval: {{models: [base, sft]}}\n"
            "data: {sft: {train: sft.jsonl}, max_length: 256}\n"
        )
        home = os.environ.get("TUNEPIPE_HOME")
        cfg = load_config(root / "cfg.yaml")
        tok = load_tokenizer(cfg, log=lambda _m: None)  # imports the model into the normal cache once
        os.environ["TUNEPIPE_HOME"] = str(root / "home")  # an empty data cache for the cold run
        times = {}
        for label in ("cold", "warm"):
            t = time.perf_counter()
            prep = prepare(cfg, tok, log=lambda _m: None)
            write_prepared(prep, root / "out")
            times[label] = time.perf_counter() - t
            n = len(prep.splits["sft_train"].rows)
            print(
                f"{label}: {n} rows in {times[label]:.1f} s ({n / times[label]:.0f} rows/s), "
                f"cache hits {prep.cache_hits}",
                flush=True,
            )
        if home is None:
            os.environ.pop("TUNEPIPE_HOME")
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "cold_s": round(times["cold"], 1),
                    "warm_s": round(times["warm"], 1),
                    "cpus": os.cpu_count(),
                }
            )
        )


if __name__ == "__main__":
    main()
