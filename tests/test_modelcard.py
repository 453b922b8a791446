"""The model card an export carries: Hugging Face metadata that huggingface_hub parses, and a body
with the stages and their hyperparameters, the data counts, the metrics table base vs each stage,
time and hardware, limitations and the license; no secret anywhere.

The slow tests read the run folder of a real smoke run (a tiny model, SFT then DPO) and of the
quickstart's smoke run (the embedded SmolLM2, whose Hub id and license the card must name); the
fast ones a run folder written by hand in the shapes the stages write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, RUN_SECRET, tunepipe, write_config

from tunepipe.config import load_config
from tunepipe.modelcard import base_model_info, model_card_text, write_model_card

CANARY = RUN_SECRET  # the smoke run (conftest) carries it in its goal and HF_TOKEN


def _card(path: Path):  # the parsed card, as the Hub's client reads it
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def _table(text: str, header_start: str) -> list[list[str]]:
    """The Markdown table whose header row starts with `header_start`, as rows of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


@pytest.mark.slow
def test_card_of_a_smoke_run_parses_and_holds_the_run(
    smoke_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_path, run_dir = smoke_run
    monkeypatch.setenv("HF_TOKEN", CANARY)
    cfg = load_config(cfg_path, [])
    path = write_model_card(cfg, run_dir, "dpo", tmp_path / "export-dpo")
    assert path == tmp_path / "export-dpo" / "README.md"
    text = path.read_text()
    meta = _card(path).data.to_dict()

    # A local base model: no base_model id, no license found -> `other` and a sentence to fix it.
    assert "base_model" not in meta
    assert meta["license"] == "other" and "Set `license:`" in text
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"tunepipe", "sft", "dpo", "lora"} <= set(meta["tags"])
    # model-index: the exported (DPO) model's metrics, exactly as eval wrote them.
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    results = meta["model-index"][0]["results"]
    got = {(r["dataset"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    want = {(s, k): v for s, vals in metrics["dpo"].items() for k, v in vals.items() if k != "n"}
    assert got == want and want

    # The metrics table: base, SFT and DPO columns with the values of metrics.json.
    rows = _table(text, "| set | metric |")
    assert rows[0][:5] == ["set", "metric", "base", "sft", "dpo"]
    for set_name, metric, *vals in rows[1:]:
        key = metric.removesuffix(" ↓")
        for model, cell in zip(["base", "sft", "dpo"], vals, strict=False):
            assert float(cell) == pytest.approx(metrics[model][set_name][key], abs=1e-4)
    assert len(rows) - 1 == sum(len(v) - 1 for v in metrics["dpo"].values())

    # Stages in order with their hyperparameters (the smoke run: 3 steps each).
    training = _table(text, "| stage | method |")
    assert [r[0] for r in training[1:]] == ["SFT", "DPO"]
    sft, dpo = training[1], training[2]
    assert sft[1:4] == ["lora", "0.01", "3"] and "LoRA r 4, alpha 8" in sft[5]
    assert "beta 0.1" in dpo[6]
    # Data sources with their accepted / rejected counts from data/stats.json.
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    data = {(r[0], r[1], r[2]): r[5:7] for r in _table(text, "| stage | split | source |")[1:]}
    for s in stats["sources"]:
        key = (s["stage"], s["split"], Path(s["file"]).name)
        assert data[key] == [str(s["rows_accepted"]), str(s["rows_rejected"])]
    assert "## Time and hardware" in text and "CPU only" in text
    assert "smoke run" in text  # the limitations say what this run is
    # The goal carried a token: the card shows it masked.
    assert CANARY not in text and "teach skills (token ***)" in text


@pytest.mark.slow
def test_card_of_an_earlier_stage_compares_only_the_models_before_it(
    smoke_run: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg_path, run_dir = smoke_run
    text = model_card_text(load_config(cfg_path, []), run_dir, "sft", tmp_path / "export-sft")
    assert _table(text, "| set | metric |")[0] == ["set", "metric", "base", "sft", "Δ sft−base"]
    assert [r[0] for r in _table(text, "| stage | method |")[1:]] == ["SFT"]
    assert "dpo" not in _card_from_text(text)["tags"]


def _card_from_text(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def _finished_quickstart() -> Path | None:
    """runs/quickstart when a full `make quickstart` finished there (CI runs it before the tests)."""
    run_dir = ROOT / "runs" / "quickstart"
    try:
        stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    done = all(stages.get(s, {}).get("status") == "done" for s in ("data", "sft", "dpo", "eval"))
    return run_dir if done else None


@pytest.mark.slow
def test_card_of_the_quickstart_run_names_smollm2_and_its_license(tmp_path: Path) -> None:
    """The quickstart config itself (the embedded SmolLM2-135M-Instruct): the card links the real
    base model, carries its license and the metrics table of base, SFT and DPO. It reads the run
    `make quickstart` left in runs/quickstart (CI makes it before the tests); without one, a
    --smoke run of the same config into a temporary folder stands in."""
    cfg = ROOT / "examples" / "quickstart.yaml"
    run_dir = _finished_quickstart()
    overrides: list[str] = []
    if run_dir is None:
        out_dir = tmp_path / "runs" / "quickstart"
        # Shorter replies and no lm-eval keep this to a few minutes; every eval set is still scored.
        overrides = [f"project.output_dir={out_dir}", "eval.lm_eval=null", "eval.max_new_tokens=4"]
        res = tunepipe("run", cfg, "--smoke", *overrides)
        assert res.returncode == 0, res.stderr[-3000:]
        run_dir = out_dir.with_name("quickstart-smoke")
    config = load_config(cfg, overrides)
    path = write_model_card(config, run_dir, "dpo", tmp_path / "export-dpo")
    meta = _card(path).data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "finetune" and meta["license"] == "apache-2.0"
    text = path.read_text()
    rows = _table(text, "| set | metric |")
    assert rows[0][:5] == ["set", "metric", "base", "sft", "dpo"]
    assert {"skills", "preferences", "arithmetic"} <= {r[0] for r in rows[1:]}
    # The table holds the run's own figures: the skills exact match of each model, as eval wrote it.
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    skills = next(r for r in rows[1:] if r[0] == "skills" and r[1] == "exact_match")
    want = [metrics[m]["skills"]["exact_match"] for m in ("base", "sft", "dpo")]
    assert [float(c) for c in skills[2:5]] == pytest.approx(want, abs=1e-4)


# --------------------------------------------------------------------------- fast: hand-written runs


def _hand_run(folder: Path, model: str) -> tuple[Path, Path]:
    """A finished SFT run folder in the shapes the stages write, over a hub dataset and a file."""
    cfg_path = write_config(folder, Path(model))
    raw = yaml.safe_load(cfg_path.read_text())
    raw["model"]["name_or_path"] = model
    raw["pipeline"] = ["sft"]
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path, [])
    run = folder / "runs" / "test"
    (run / "sft").mkdir(parents=True)
    from tunepipe.config import dump_resolved

    (run / "config.resolved.yaml").write_text(dump_resolved(cfg))
    stages = {
        "data": {"status": "done", "seconds": 3.0, "summary": "sft_train 124 rows"},
        "sft": {"status": "done", "seconds": 600.0, "summary": "200 steps"},
        "eval": {"status": "done", "seconds": 40.0, "summary": "metrics"},
    }
    (run / "pipeline.json").write_text(json.dumps({"stages": stages}))
    (run / "sft" / "stage.json").write_text(
        json.dumps({"stage": "sft", "status": "done", "outputs": {"steps": 200, "world_size": 1}})
    )
    (run / "env.json").write_text(
        json.dumps({"python": "3.11", "gpus": ["NVIDIA H100 80GB"], "packages": {}})
    )
    sources = [
        {"stage": "sft", "split": "train", "file": "hub:someone/chat-data", "format": "messages",
         "rows_in": 100, "rows_accepted": 97, "rows_rejected": 3, "weight": 1.0},
        {"stage": "sft", "split": "train", "file": str(folder / "data" / "mine.jsonl"), "format": "messages",
         "rows_in": 24, "rows_accepted": 24, "rows_rejected": 0, "weight": 1.0},
    ]  # fmt: skip
    (run / "data").mkdir()
    (run / "data" / "stats.json").write_text(json.dumps({"sources": sources, "splits": {}}))
    (run / "eval").mkdir()
    metrics = {
        "base": {"sft_eval": {"exact_match": 0.1, "n": 500}},
        "sft": {"sft_eval": {"exact_match": 0.6, "n": 500}},
    }
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return cfg_path, run


def test_hub_base_model_and_hub_dataset_go_into_the_metadata(tmp_path: Path) -> None:
    cfg_path, run = _hand_run(tmp_path, "some-org/some-model")
    text = model_card_text(load_config(cfg_path, []), run, "sft", tmp_path / "export-sft", repo_id="me/m")
    meta = _card_from_text(text)
    assert meta["base_model"] == "some-org/some-model" and meta["datasets"] == ["someone/chat-data"]
    assert meta["license"] == "other"  # nothing cached for that id offline: the user is told to set it
    data = _table(text, "| stage | split | source |")
    assert ["sft", "train", "hub:someone/chat-data", "messages", "100", "97", "3"] in data
    assert ["sft", "train", "mine.jsonl", "messages", "24", "24", "0"] in data
    assert "1× NVIDIA H100 80GB" in text and 'model_id = "me/m"' in text
    assert "Small eval sets" not in text  # 500 examples


def test_gguf_card_is_tagged_and_says_how_to_run_it(tmp_path: Path) -> None:
    cfg_path, run = _hand_run(tmp_path, "some-org/some-model")
    out = tmp_path / "export-sft-gguf"
    out.mkdir()
    (out / "some-model-sft.f16.gguf").write_bytes(b"GGUF")
    (out / "tunepipe-export.json").write_text(json.dumps({"stage": "sft", "format": "gguf", "quant": "f16"}))
    path = write_model_card(load_config(cfg_path, []), run, "sft", out, fmt="gguf", repo_id="me/m-gguf")
    meta = _card(path).data.to_dict()
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"]
    text = path.read_text()
    assert "ollama run hf.co/me/m-gguf" in text and "llama-cli -m some-model-sft.f16.gguf" in text
    assert "one GGUF file (f16)" in text


def test_license_comes_from_the_base_models_own_card(tmp_path: Path) -> None:
    model = tmp_path / "my-base"
    model.mkdir()
    (model / "README.md").write_text(
        "---\nlicense: other\nlicense_name: acme-1\nlicense_link: LICENSE\n---\nhi"
    )
    info = base_model_info(str(model), None, tmp_path)
    assert info.hub_id is None and info.label == "my-base"
    assert (info.license, info.license_extra) == (
        "other",
        {"license_name": "acme-1", "license_link": "LICENSE"},
    )
    embedded = base_model_info("smollm2-135m-instruct", None, tmp_path)
    assert (embedded.hub_id, embedded.license) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
