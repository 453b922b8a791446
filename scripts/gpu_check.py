"""GPU check (never in CI): QLoRA SFT + DPO on the embedded model for a few minutes on one CUDA GPU.

Also runs the whole pipeline as `tunepipe run` does on several GPUs, through its own launcher
(a process group of one on this one GPU; TUNEPIPE_LAUNCH=always), with DDP and with FSDP2.

Writes tokens/s, peak memory and MFU per stage to a JSON file, for two variants of the same run:
`optimized` (tunepipe's defaults: length-grouped batches, padding-free SFT where flash-attn works,
gradient checkpointing only when the memory plan needs it, liger-kernel when installed) and `plain`
(those off, checkpointing on, as TRL's defaults have it). Per stage it also records whether liger's
kernels were applied (the stage log's "kernels: on" line) and the last logged train loss, so the two
variants' losses can be compared:

    python scripts/gpu_check.py --out gpu_check.json [--sft-steps 60] [--dpo-steps 30]

MFU counts 4N FLOPs per trained token for LoRA/QLoRA (forward 2N + backward through the frozen
weights 2N; no weight gradients) and 6N for full fine-tuning; DPO adds the reference forward (2N)
per token. N is the model's parameter count. Peak FLOPs come from a table of dense bf16 figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--dpo-steps", type=int, default=30)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; this machine has none (CPU runs are covered by `make test`)")
        return 2
    import yaml

    from tunepipe.config import load_config
    from tunepipe.pipeline import run_dir_for, run_pipeline

    gpu = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    with tempfile.TemporaryDirectory() as tmp:
        data = ROOT / "examples" / "data"
        cfg_path = Path(tmp) / "gpu_check.yaml"
        cfg_path.write_text(
            yaml.safe_dump(
                {
                    "project": {"name": "gpu-check", "output_dir": str(Path(tmp) / "run")},
                    "model": {"name_or_path": "smollm2-135m-instruct", "load_in_4bit": True},
                    "data": {
                        "sft": {
                            "train": str(data / "skills_sft_train.jsonl"),
                            "eval": str(data / "skills_sft_eval.jsonl"),
                        },
                        "dpo": {
                            "train": str(data / "skills_dpo_train.jsonl"),
                            "eval": str(data / "skills_dpo_eval.jsonl"),
                        },
                        "max_length": 128,
                    },
                    "training": {"logging_steps": 5, "save_steps": 1000},
                    "sft": {
                        "method": "qlora",
                        "max_steps": args.sft_steps,
                        "learning_rate": 1e-3,
                        "per_device_train_batch_size": 16,
                        "gradient_accumulation_steps": 1,
                    },
                    "dpo": {
                        "method": "qlora",
                        "max_steps": args.dpo_steps,
                        "learning_rate": 5e-4,
                        "per_device_train_batch_size": 8,
                        "gradient_accumulation_steps": 1,
                        "sft_weight": 1.0,
                    },
                    "eval": {"max_new_tokens": 16, "batch_size": 48},
                }
            )
        )
        results: dict = {
            "gpu": gpu,
            "torch": torch.__version__,
            "peak_bf16_flops": peak,
            "variants": {},
            "launched": {},
        }
        for variant, overrides in VARIANTS.items():
            cfg = load_config(cfg_path, [*overrides, f"project.output_dir={Path(tmp) / variant}"])
            results["variants"][variant] = _stages(cfg, peak, run_pipeline, run_dir_for)
            if variant == "optimized":
                run_pipeline(cfg, stages=["eval"], echo=print)
                results["metrics"] = json.loads(
                    (run_dir_for(cfg, False) / "eval" / "metrics.json").read_text()
                )
        # The launch path `tunepipe run` takes on several GPUs (a process group of one here: one GPU),
        # as a real command: DDP and FSDP2, QLoRA SFT -> DPO -> eval.
        for name, extra in LAUNCHED.items():
            results["launched"][name] = _launched(cfg_path, Path(tmp) / f"launched-{name}", extra)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


# The optimizations switched off one by one would take too long here; `plain` switches them all off.
VARIANTS = {
    "optimized": [],
    "plain": [
        "sft.group_by_length=false",
        "sft.padding_free=false",
        "sft.gradient_checkpointing=true",
        "sft.lm_head_loss_positions_only=false",  # no-op on CUDA (TRL already does it): listed for CPU runs
        "dpo.group_by_length=false",
        "dpo.lm_head_loss_positions_only=false",
        "training.liger_kernel=false",
        "dpo.gradient_checkpointing=true",
    ],
}


def _stages(cfg, peak, run_pipeline, run_dir_for) -> dict:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    from tunepipe.modeling import model_path

    run = run_dir_for(cfg, False)
    results: dict = {}
    run_pipeline(cfg, stages=["data"], echo=print)
    n_params = AutoModelForCausalLM.from_pretrained(model_path(cfg)).num_parameters()
    results["model_parameters"] = n_params
    stats = json.loads((run / "data" / "stats.json").read_text())["splits"]
    for stage, per_token in (("sft", 4), ("dpo", 6)):
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        run_pipeline(cfg, stages=[stage], echo=print)
        wall = time.time() - t0
        out = json.loads((run / stage / "stage.json").read_text())["outputs"]
        s = getattr(cfg, stage)
        seqs = out["steps"] * s.per_device_train_batch_size * s.gradient_accumulation_steps
        tokens = seqs * stats[f"{stage}_train"]["mean"] * (2 if stage == "dpo" else 1)  # approx: mean length
        runtime = out.get("train_runtime_s") or wall
        tps = tokens / runtime
        results[stage] = {
            "steps": out["steps"],
            "train_runtime_s": runtime,
            "wall_s": round(wall, 1),
            "tokens_per_s_approx": round(tps),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "mfu": round(tps * per_token * n_params / peak, 4) if peak else None,
            "liger_applied": "kernels: on" in (run / "logs" / f"{stage}.log").read_text(),
            "last_loss": next(
                (r["loss"] for r in reversed(_log_rows(run / stage / "log.jsonl")) if "loss" in r), None
            ),
        }
    return results


LAUNCHED = {
    "ddp": ["hardware.processes=1"],
    # FSDP2 keeps 4-bit weights shardable only when they are stored as bf16.
    "fsdp": ["hardware.processes=1", "hardware.sharding=fsdp", "model.bnb_4bit_quant_storage=bfloat16"],
}


def _launched(cfg_path: Path, out_dir: Path, extra: list[str]) -> dict:
    import os
    import subprocess

    cmd = [sys.executable, "-m", "tunepipe", "run", str(cfg_path), f"project.output_dir={out_dir}", *extra]
    t0 = time.time()
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TUNEPIPE_LAUNCH": "always"}, timeout=1800
    )
    res: dict = {
        "command": " ".join(cmd[2:]),
        "exit_code": r.returncode,
        "wall_s": round(time.time() - t0, 1),
    }
    if r.returncode:
        res["stderr_tail"] = r.stderr[-3000:]
    for stage in ("sft", "dpo", "eval"):
        sj = out_dir / stage / "stage.json"
        if sj.is_file():
            st = json.loads(sj.read_text())
            res[stage] = {
                "status": st["status"],
                "seconds": st["seconds"],
                "world_size": st["outputs"].get("world_size"),
                "launched": "launching 1 process " in (out_dir / "logs" / f"{stage}.log").read_text(),
                "last_loss": next(
                    (x["loss"] for x in reversed(_log_rows(out_dir / stage / "log.jsonl")) if "loss" in x),
                    None,
                ),
            }
    return res


def _log_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


if __name__ == "__main__":
    sys.exit(main())
