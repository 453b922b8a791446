"""The eval stage sharded over two CPU processes (gloo, launched with torchrun as on a GPU box) gives
the metrics and samples of one process, and only the main process writes the run folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skills_data, tunepipe, write_config, write_jsonl

from tunepipe.evaluation import shard_batches, shard_size

LM_TASK = """
task: ab_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: ab_choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{question}}\\nA:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(processes: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node N ARGS` on CPU (gloo), as a GPU box would run it."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        *map(str, args),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "NO_COLOR": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _lines(path: Path) -> list[str]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _sets(folder: Path) -> list[dict]:
    """The prepared splits, plus sets whose sizes do not divide by two processes or by the batch: three
    conversations (two batches of 2 and 1) and one pair (a single batch: the second process has none)."""
    data = folder / "data"
    sft_rows = _lines(data / "skills_sft_eval.jsonl")
    dpo_rows = _lines(data / "skills_dpo_eval.jsonl")
    write_jsonl(data / "odd_conversations.jsonl", sft_rows[-3:])
    write_jsonl(data / "one_pair.jsonl", dpo_rows[-1:])
    return [
        {"name": "sft_eval", "source": "sft_eval"},
        {"name": "dpo_eval", "source": "dpo_eval"},
        {"name": "odd", "source": "data/odd_conversations.jsonl"},
        {"name": "one_pair", "source": "data/one_pair.jsonl"},
    ]


def _lm_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ab_choice.yaml").write_text(LM_TASK)
    rows = [{"question": f"item {i}", "choices": ["a a a", "b b b"], "answer": i % 2} for i in range(6)]
    write_jsonl(folder / "ab_choice.jsonl", rows)
    return folder


def _numbers(metrics: dict) -> dict[tuple[str, str, str], float]:
    return {(m, s, k): v for m, sets in metrics.items() for s, vals in sets.items() for k, v in vals.items()}


def test_every_batch_falls_to_exactly_one_process() -> None:
    for n_batches in (0, 1, 2, 5):
        for world in (1, 2, 3):
            got = sorted(b for r in range(world) for b in shard_batches(n_batches, (r, world)))
            assert got == list(range(n_batches))
    # 7 items in batches of 2 ([2, 2, 2, 1]) over 2 processes: batches 0, 2 and 1, 3.
    assert [shard_size(7, 2, (r, 2)) for r in range(2)] == [4, 3]
    assert [shard_size(1, 2, (r, 2)) for r in range(2)] == [1, 0]


SHARD_SCRIPT = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from tunepipe import dist
from tunepipe.evaluation import generate, sequence_logprobs

assert dist.ensure_process_group()
me = (dist.rank(), dist.world_size())
assert dist.all_gather_objects({"rank": me[0]}) == [{"rank": 0}, {"rank": 1}]
assert dist.on_main(lambda: dist.rank() + 41) == 41  # computed by rank 0, returned to both

# Sharded over both processes == all of it in this process alone: greedy, sampled, log-probs.
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
prompts = [f"question {'x ' * (i % 4)}{i}" for i in range(7)]
for kw in ({}, {"do_sample": True, "temperature": 1.5, "seed": 3}):
    alone = generate(model, tok, prompts, 6, 2, **kw)
    assert generate(model, tok, prompts, 6, 2, shard=me, **kw) == alone, kw
seqs = [(tok(p)["input_ids"], tok(p)["input_ids"]) for p in prompts]
assert sequence_logprobs(model, seqs, tok.pad_token_id, 2, shard=me) == sequence_logprobs(
    model, seqs, tok.pad_token_id, 2
)

def fails():
    raise ValueError("main failed")
try:
    dist.on_main(fails)
except ValueError as e:
    print(f"rank {dist.rank()} raised {e}", flush=True)
    sys.exit(0)
sys.exit(1)
"""


@pytest.mark.multiproc
def test_sharded_generation_and_logprobs_equal_one_process_and_main_errors_reach_all(
    tmp_path: Path, tiny_qwen3: Path
) -> None:
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    r = _torchrun(2, script, tiny_qwen3)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 0 raised main failed" in r.stdout and "rank 1 raised main failed" in r.stdout


@pytest.mark.multiproc
@pytest.mark.slow
def test_eval_in_two_processes_equals_one_process(tmp_path: Path, tiny_qwen3: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency: make dev")
    skills_data(tmp_path / "data")  # the files the extra sets are cut from
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        eval={
            "batch_size": 2,  # several batches per set, so both processes get work and padding
            "sets": _sets(tmp_path),
            "metrics": [
                "exact_match",
                "rouge_l",
                "loss",
                "perplexity",
                "preference_accuracy",
                "reward_margin",
            ],
            "lm_eval": {"tasks": ["ab_choice"], "include_path": str(_lm_task(tmp_path / "tasks"))},
        },
    )
    run = tmp_path / "runs" / "test-smoke"

    # One process: data, SFT, DPO and the reference eval.
    first = tunepipe("run", cfg, "--smoke")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    one = tmp_path / "eval-one-process"
    shutil.copytree(run / "eval", one)

    # The same adapters, evaluated by two processes.
    r = _torchrun(2, "-m", "tunepipe", "eval", cfg, "--smoke")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = run / "eval"
    assert json.loads((two / "stage.json").read_text())["status"] == "done"

    one_metrics = json.loads((one / "metrics.json").read_text())
    two_metrics = json.loads((two / "metrics.json").read_text())
    a, b = _numbers(one_metrics), _numbers(two_metrics)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
    # Every set counted whole: no row lost or counted twice by the split.
    for model in ("base", "sft", "dpo"):
        sizes = {s: two_metrics[model][s]["n"] for s in ("sft_eval", "dpo_eval", "odd", "one_pair")}
        assert sizes == {"sft_eval": 4, "dpo_eval": 4, "odd": 3, "one_pair": 1}
        assert "ab_choice" in two_metrics[model]

    # Samples byte for byte: the same greedy generations and margins, in the same order.
    names = sorted(p.name for p in (one / "samples").iterdir())
    assert names == sorted(p.name for p in (two / "samples").iterdir())
    assert len(names) == 3 * 4
    for name in names:
        assert (two / "samples" / name).read_text() == (one / "samples" / name).read_text(), name
    odd = _lines(two / "samples" / "dpo.odd.jsonl")
    assert [x["reference"] for x in odd] == [
        x["messages"][-1]["content"] for x in _lines(tmp_path / "data" / "odd_conversations.jsonl")
    ]

    # One writer: nothing of the second process in eval/, its log in its own file; lm-eval ran once
    # (in the main process), the second process got its numbers.
    assert not [p for p in two.rglob("*") if "rank" in p.name or p.name.startswith(".")]
    rank1 = (run / "logs" / "eval.rank1.log").read_text()
    main_log = (run / "logs" / "eval.log").read_text()
    assert "lm-eval" not in rank1 and "lm-eval" in main_log.split("[eval] running")[-1]
    assert "base ab_choice: acc=" in rank1
    # Each process evaluated its share: per model 24 sequences (sft_eval 4 rows generated + scored,
    # dpo_eval 8, odd 3 + 3, one_pair 2) in batches of 2; the second gets no batch of one_pair.
    for model in ("base", "sft ", "dpo "):
        assert f"{model} process 0 of 2 evaluated 14 of 24 sequences" in main_log
        assert f"{model} process 1 of 2 evaluated 10 of 24 sequences" in rank1
