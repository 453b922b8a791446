"""lm-evaluation-harness on a local task definition (offline) with the tiny model, and the whole eval
stage with file sets, user scorers and lm-eval through the real CLI, followed by `chat`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tunepipe, write_config, write_jsonl

pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency: make dev")

TASK = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def _task(folder: Path, name: str = "ab_choice") -> Path:
    """Each question's right answer is 'a a a' and the distractor 'b b b', in varying positions."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(TASK.format(name=name))
    rows = [
        {
            "question": f"item {i}",
            "choices": ["a a a", "b b b"] if i % 2 else ["b b b", "a a a"],
            "answer": i % 2 ^ 1,
        }
        for i in range(8)
    ]
    write_jsonl(folder / f"{name}.jsonl", rows)
    return folder


def _favouring(model_dir: Path, letter: str):
    """The tiny model with a context-free LM head that favours `letter`, with or without the byte-level
    leading space (Ġ), over every other token (see test_evaluation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    head = torch.nn.Linear(m.config.hidden_size, len(tok), bias=True)
    torch.nn.init.zeros_(head.weight)
    head.bias.data = torch.zeros(len(tok))
    for token in (letter, "Ġ" + letter):
        head.bias.data[tok.convert_tokens_to_ids(token)] = 5.0
    m.config.tie_word_embeddings = False
    m.lm_head = head
    return m, tok


def test_lm_eval_local_task_scores_known_answers(tmp_path: Path, tiny_qwen3: Path) -> None:
    from tunepipe.benchmarks import BenchmarkError, run_lm_eval

    tasks = _task(tmp_path / "tasks")
    kw = dict(limit=None, num_fewshot=None, include_path=tasks, batch_size=4, log=lambda _m: None)
    # A model that prefers 'a' picks the right choice every time; one that prefers 'b' never does.
    good = run_lm_eval(*_favouring(tiny_qwen3, "a"), ["ab_choice"], **kw)
    bad = run_lm_eval(*_favouring(tiny_qwen3, "b"), ["ab_choice"], **kw)
    assert good["ab_choice"]["acc"] == 1.0 and bad["ab_choice"]["acc"] == 0.0
    with pytest.raises(BenchmarkError, match="unknown task"):
        run_lm_eval(*_favouring(tiny_qwen3, "a"), ["no_such_task_xyz"], **kw)


@pytest.mark.slow
def test_eval_sets_scorers_lm_eval_report_and_chat(tmp_path: Path, tiny_qwen3: Path) -> None:
    _task(tmp_path / "tasks")
    write_jsonl(
        tmp_path / "data" / "sums.jsonl",
        [{"prompt": f"What is {a} + {a}?", "completion": str(2 * a)} for a in range(11, 17)],
    )
    (tmp_path / "myscore.py").write_text(
        "def short(prediction, reference):\n    return len(prediction) <= 8\n"
    )
    cfg = write_config(
        tmp_path,
        tiny_qwen3,
        eval={
            "sets": [
                {
                    "name": "skills",
                    "source": "sft_eval",
                    "metrics": ["exact_match", "contains", "rouge_l", "myscore:short", "loss", "perplexity"],
                },
                {"name": "prefs", "source": "dpo_eval", "metrics": ["preference_accuracy", "reward_margin"]},
                {
                    "name": "sums",
                    "source": "data/sums.jsonl",
                    "metrics": ["numeric_match", "regex_match", "loss"],
                    "regex": r"(\d+)",
                },
            ],
            "lm_eval": {"tasks": ["ab_choice"], "include_path": "tasks"},
        },
    )
    r = tunepipe("run", cfg, "--smoke")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "test-smoke"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for model in ("base", "sft", "dpo"):
        m = metrics[model]
        assert set(m["skills"]) == {"exact_match", "contains", "rouge_l", "short", "loss", "perplexity", "n"}
        assert m["skills"]["perplexity"] == pytest.approx(
            torch.tensor(m["skills"]["loss"]).exp().item(), rel=1e-3
        )
        assert set(m["prefs"]) == {"preference_accuracy", "reward_margin", "n"}
        assert set(m["sums"]) == {"numeric_match", "regex_match", "loss", "n"} and m["sums"]["n"] == 4
        assert 0.0 <= m["ab_choice"]["acc"] <= 1.0
        samples = [
            json.loads(x)
            for x in (run / "eval" / "samples" / f"{model}.skills.jsonl").read_text().splitlines()
        ]
        assert len(samples) == 4 and set(samples[0]) >= {"prompt", "reference", "output", "score"}
        assert set(samples[0]["score"]) == {"exact_match", "contains", "rouge_l", "short"}
        # The set's score is the mean of the per-example scores written next to it.
        mean = sum(x["score"]["contains"] for x in samples) / 4
        assert m["skills"]["contains"] == pytest.approx(mean, abs=1e-4)
    md = (run / "report" / "report.md").read_text()
    assert "| sums | numeric_match |" in md and "| ab_choice | acc |" in md and "## Sample generations" in md

    # chat answers with the DPO model by default, the base model with --stage base.
    from tunepipe.config import load_config
    from tunepipe.evaluation import generate
    from tunepipe.modeling import load_stage_model, load_tokenizer, plan_for

    c = load_config(cfg)
    tok = load_tokenizer(c, log=lambda _m: None)
    question = "What is 12 + 30?"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    expected = {}
    for stage in ("base", "dpo"):
        model = load_stage_model(c, plan_for(c.model), run, stage, log=lambda _m: None).eval()
        expected[stage] = generate(model, tok, [prompt], 12, 1)[0].strip()
    for stage, args in (("dpo", []), ("base", ["--stage", "base"])):
        out = tunepipe("chat", cfg, "--smoke", "--prompt", question, "--max-new-tokens", "12", *args)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == expected[stage], stage
    missing = tunepipe("chat", tmp_path / "nope.yaml", "--prompt", "hi")
    assert missing.returncode == 2 and "no such config file or model folder" in missing.stderr

    # A stage that fails unexpectedly prints a diagnosis and saves it under logs/.
    import shutil

    shutil.rmtree(run / "dpo" / "adapter")
    broken = tunepipe("eval", cfg, "--smoke")
    assert broken.returncode == 1
    saved = (run / "logs" / "eval.diagnosis.txt").read_text()
    assert "Where" in saved and "FileNotFoundError" in saved and "dpo/adapter" in saved
    assert json.loads((run / "logs" / "eval.diagnosis.json").read_text())["where"]["exception"]
    assert "Where" in broken.stdout + broken.stderr
