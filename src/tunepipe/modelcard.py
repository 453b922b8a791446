"""The model card (README.md) of an exported model: what was trained, on what, how well, how long.

Written from the run folder only (config.resolved.yaml, pipeline.json, env.json, data/stats.json,
<stage>/stage.json, eval/metrics.json, eval/samples/), like the report, so the card describes the run
that made the weights even if the config was edited since. The YAML front matter is Hugging Face
model-card metadata built with `huggingface_hub.ModelCardData` (base_model, license, library_name,
pipeline_tag, tags, datasets, and a model-index with the exported stage's eval metrics) and the
whole card is checked to parse with `huggingface_hub.ModelCard` before it is written. Every string
goes through redaction: no secret reaches the card.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, StageTrainingConfig
from .redaction import redact, redact_text
from .stages import registry
from .stages.report import (
    RunData,
    _duration,
    _markdown,
    _models,
    _worse,
    metrics_table,
    read_run,
    stage_time_table,
)

CARD_NAME = "README.md"
# Hub ids of the embedded models (tunepipe.quickstart.model) and their licenses, so a card of the
# quickstart links its real base model. SmolLM2 is Apache-2.0 (its model card and its GGUF's
# general.license say so).
EMBEDDED_ON_HUB = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
SMALL_EVAL_SET = 200  # fewer examples than this: a few points of a metric are noise
FEW_STEPS = 100
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelCardError(Exception):
    """The card could not be built into valid metadata (a bug, or a run folder that is not one)."""


@dataclass(frozen=True)
class BaseModelInfo:
    hub_id: str | None  # the base model's Hub id, when it is one
    label: str  # how the card names it: the hub id, or a local folder's name
    license: str | None  # None: unknown
    license_extra: dict[str, str]  # license_name / license_link of a custom license
    license_source: str  # where the license was read, for the card's License section


def _front_matter(readme: Path) -> dict[str, Any]:
    from huggingface_hub import metadata_load

    if not readme.is_file():
        return {}
    try:
        return metadata_load(readme) or {}
    except Exception:  # a base model's README with broken YAML: no license from it
        return {}


def base_model_info(name_or_path: str, revision: str | None, base_dir: Path) -> BaseModelInfo:
    """The base model as a card states it: a Hub id and the license when they can be known offline
    (the embedded alias; a local folder's or the Hub cache's README.md front matter)."""
    if name_or_path in EMBEDDED_ON_HUB:
        hub_id, lic = EMBEDDED_ON_HUB[name_or_path]
        return BaseModelInfo(hub_id, hub_id, lic, {}, f"the license of {hub_id}")
    local = Path(name_or_path).expanduser()
    local = local if local.is_absolute() else base_dir / local
    if local.is_dir():
        meta = _front_matter(local / "README.md")
        where = f"the base model folder's README.md ({local.name})"
        return BaseModelInfo(None, local.name, meta.get("license"), _license_extra(meta), where)
    if _HUB_ID.match(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "README.md", revision=revision)
        meta = _front_matter(Path(cached)) if isinstance(cached, str) else {}
        where = f"the README.md of {name_or_path} (from the local Hub cache)"
        return BaseModelInfo(name_or_path, name_or_path, meta.get("license"), _license_extra(meta), where)
    return BaseModelInfo(None, Path(name_or_path).name, None, {}, "")


def _redacted(base: BaseModelInfo) -> BaseModelInfo:
    """The base model's strings with any secret hidden (they go into the YAML metadata)."""
    return BaseModelInfo(
        redact_text(base.hub_id) if base.hub_id else None,
        redact_text(base.label),
        redact_text(base.license) if base.license else None,
        {k: redact_text(v) for k, v in base.license_extra.items()},
        redact_text(base.license_source),
    )


def _license_extra(meta: dict[str, Any]) -> dict[str, str]:
    return {k: str(meta[k]) for k in ("license_name", "license_link") if meta.get(k)}


# --------------------------------------------------------------------------- sections


def _raw_config(run: RunData, cfg: Config) -> dict[str, Any]:
    """The run's resolved config (what trained these weights); the given config if the run has none."""
    import yaml

    try:
        raw = yaml.safe_load(run.config_text) if run.config_text else None
    except yaml.YAMLError:
        raw = None
    return raw if isinstance(raw, dict) else redact(cfg.model_dump(mode="json"))


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ", ".join(_value(x.get("name", x) if isinstance(x, dict) else x) for x in v)
    return str(v)


def _stage_settings(name: str, section: dict[str, Any]) -> str:
    """The settings a stage has beyond the shared ones (DPO beta, GRPO num_generations, ...)."""
    shared = set(StageTrainingConfig.model_fields)
    own = registry.get(name).section.model_fields if registry.is_training_stage(name) else {}
    parts = [f"{k} {_value(section[k])}" for k in own if k not in shared and k in section]
    return "; ".join(parts) or "—"


def _training_rows(run: RunData, raw: dict[str, Any], chain: list[str]) -> list[list[str]]:
    rows = [["stage", "method", "learning rate", "steps", "batch", "adapter", "stage settings"]]
    for name in chain:
        sec = raw.get(name) or {}
        out = run.stage_json.get(name, {}).get("outputs", {})
        steps = out.get("steps") or (sec.get("max_steps") if sec.get("max_steps", -1) > 0 else None)
        steps_text = str(steps) if steps else f"{_value(sec.get('num_train_epochs', '?'))} epochs"
        micro = out.get("per_device_train_batch_size", sec.get("per_device_train_batch_size", "?"))
        accum = out.get("gradient_accumulation_steps", sec.get("gradient_accumulation_steps", "?"))
        world = out.get("world_size", 1)
        batch = f"{micro} × {accum}" + (f" × {world} processes" if world and world > 1 else "")
        method = sec.get("method", "?")
        lora = sec.get("lora") or {}
        adapter = (
            f"LoRA r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {_value(lora.get('dropout'))}"
            if method in ("lora", "qlora")
            else (f"last {sec.get('freeze_trainable_layers')} layers" if method == "freeze" else "—")
        )
        lr = sec.get("learning_rate")
        rows.append(
            [
                registry.title(name),
                str(method),
                f"{lr:g}" if isinstance(lr, int | float) else "?",
                steps_text,
                batch,
                adapter,
                _stage_settings(name, sec),
            ]
        )
    return rows


def _source_name(file: str) -> str:
    return file if file.startswith("hub:") else Path(file).name


def _data_rows(run: RunData, chain: list[str]) -> list[list[str]]:
    rows = [["stage", "split", "source", "format", "rows in", "accepted", "rejected"]]
    for s in run.stats.get("sources", []):
        if s.get("stage") in chain:
            rows.append(
                [
                    str(s.get("stage")),
                    str(s.get("split")),
                    _source_name(str(s.get("file", "?"))),
                    str(s.get("format", "?")),
                    str(s.get("rows_in", "?")),
                    str(s.get("rows_accepted", "?")),
                    str(s.get("rows_rejected", "?")),
                ]
            )
    return rows if len(rows) > 1 else []


def _hub_datasets(run: RunData, chain: list[str]) -> list[str]:
    files = [str(s.get("file", "")) for s in run.stats.get("sources", []) if s.get("stage") in chain]
    return list(dict.fromkeys(f[4:] for f in files if f.startswith("hub:")))


def _stage_line(name: str) -> str:
    if not registry.is_training_stage(name):
        return name
    st = registry.get(name)
    return f"**{st.title}**: {st.summary}"


def _hardware(env: dict[str, Any]) -> str:
    gpus = env.get("gpus") or []
    hw = f"{len(gpus)}× {gpus[0]}" if gpus else f"CPU only ({env.get('cpu_count', '?')} cores)"
    pkgs = env.get("packages", {})
    versions = ", ".join(f"{k} {v}" for k, v in pkgs.items() if v)
    return f"{hw}; Python {env.get('python', '?')}" + (f"; {versions}" if versions else "")


def _eval_models(metrics: dict[str, Any], chain: list[str]) -> dict[str, Any]:
    """base and the stages that make up this model, in that order (a later stage is another model)."""
    keep = ["base", *chain]
    return {m: metrics[m] for m in _models(metrics) if m in keep}


def _limitations(run: RunData, chain: list[str], stage: str, metrics: dict[str, Any]) -> list[str]:
    out = []
    if run.run_dir.name.endswith("-smoke"):
        out.append(
            "This is a **smoke run** (`--smoke`: a tiny subset and a few steps, to check the pipeline): "
            "the weights are not meant to be used."
        )
    for name in chain:
        status = run.pipeline.get("stages", {}).get(name, {}).get("status")
        if status and status != "done":
            out.append(f"The {registry.title(name)} stage is **{status}**, not done, in this run.")
    if not (run.env.get("gpus") or []):
        out.append("Trained on CPU only.")
    steps = sum(run.stage_json.get(n, {}).get("outputs", {}).get("steps") or 0 for n in chain)
    if 0 < steps < FEW_STEPS:
        out.append(f"Trained for {steps} optimizer steps in all: a short run.")
    if not metrics.get(stage):
        out.append("Not evaluated: the run has no eval metrics for this model.")
    sizes = {s: v.get("n") for s, v in metrics.get(stage, {}).items() if isinstance(v.get("n"), int)}
    small = {s: n for s, n in sizes.items() if n < SMALL_EVAL_SET}
    if small:
        listed = ", ".join(f"{s} ({n})" for s, n in small.items())
        out.append(f"Small eval sets: {listed} examples; differences of a few points are within the noise.")
    order = [m for m in ["base", *chain] if m in metrics]
    for a, b in zip(order, order[1:], strict=False):
        for set_name, vals in metrics[b].items():
            for k, vb in vals.items():
                va = metrics[a].get(set_name, {}).get(k)
                if (
                    k != "n"
                    and isinstance(va, int | float)
                    and isinstance(vb, int | float)
                    and _worse(k, va, vb)
                ):
                    out.append(f"{k} on {set_name} got worse from {a} to {b}: {va:.4g} → {vb:.4g}.")
    out.append(
        "It inherits the limitations and biases of the base model, was tuned only on the data listed "
        "above, and was not evaluated for safety or on tasks beyond the eval sets shown."
    )
    return out


def _example_prompt(run: RunData, stage: str) -> str:
    """A prompt from the held-out samples of this model (else a generic one) for the usage snippet."""
    for f in sorted((run.run_dir / "eval" / "samples").glob(f"{stage}.*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines()[:1]:
            try:
                prompt = json.loads(line).get("prompt")
            except json.JSONDecodeError:
                continue
            if isinstance(prompt, str) and 0 < len(prompt) <= 200 and "\n" not in prompt:
                return prompt
    return "Hello! What can you do?"


def _gguf_quant(out: Path) -> str:
    marker = out / "tunepipe-export.json"
    try:
        quant = json.loads(marker.read_text()).get("quant") if marker.is_file() else None
    except json.JSONDecodeError:
        quant = None
    return str(quant or "weights as exported")


def _usage(fmt: str, model_ref: str, prompt: str, out: Path) -> list[str]:
    if fmt == "gguf":
        ggufs = sorted(p.name for p in out.glob("*.gguf"))
        file = ggufs[0] if ggufs else "MODEL.gguf"
        lines = [
            "With [llama.cpp](https://github.com/ggml-org/llama.cpp) or [Ollama](https://ollama.com):",
            "",
            "```bash",
            f"llama-cli -hf {model_ref}        # or, in this folder: llama-cli -m {file} -cnv",
            f"ollama run hf.co/{model_ref}",
        ]
        if (out / "Modelfile").is_file():
            lines.append("ollama create my-model -f Modelfile   # in this folder: template and stops")
        return [*lines, "```"]
    return [
        "With transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model_id = "{model_ref}"'
        + ("" if "/" in model_ref else "  # this folder, or its Hub id once pushed"),
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        "model = AutoModelForCausalLM.from_pretrained(model_id)",
        f"messages = [{{'role': 'user', 'content': {prompt!r}}}]",
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"',
        ")",
        "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        'print(tokenizer.decode(out[0][inputs["input_ids"].shape[-1]:], skip_special_tokens=True))',
        "```",
        "",
        f"or `tunepipe chat {model_ref}` (a local folder) for a conversation through its chat template.",
    ]


# --------------------------------------------------------------------------- the card


def _card_data(
    base: BaseModelInfo,
    fmt: str,
    model_name: str,
    chain: list[str],
    methods: list[str],
    datasets: list[str],
    own_metrics: dict[str, dict[str, float]],
) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=set_name,
            dataset_name=set_name,
            metric_type=metric,
            metric_name=metric,
            metric_value=value,
        )
        for set_name, vals in own_metrics.items()
        for metric, value in vals.items()
        if metric != "n" and isinstance(value, int | float)
    ]
    tags = ["tunepipe", *chain, *methods, *(["gguf"] if fmt == "gguf" else [])]
    return ModelCardData(
        base_model=base.hub_id,
        base_model_relation="finetune" if base.hub_id else None,
        library_name="gguf" if fmt == "gguf" else "transformers",
        license=base.license or "other",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        datasets=datasets or None,
        model_name=model_name if results else None,
        eval_results=results or None,
        **base.license_extra,
    )


def model_card_text(
    cfg: Config, run_dir: Path, stage: str, out: Path, fmt: str = "hf", repo_id: str | None = None
) -> str:
    """The README.md text for the `stage` model of `run_dir`, as exported in format `fmt` to `out`."""
    run = read_run(run_dir)
    raw = _raw_config(run, cfg)
    chain = registry.chain(cfg, stage)
    model_raw = raw.get("model") or {}
    base = base_model_info(
        str(model_raw.get("name_or_path") or cfg.model.name_or_path),
        model_raw.get("revision"),
        cfg.path("."),
    )
    project = raw.get("project") or {}
    name = str(project.get("name") or cfg.project.name)
    methods = list(dict.fromkeys(str((raw.get(s) or {}).get("method", "lora")) for s in chain))
    metrics = _eval_models(run.metrics, chain)
    title = f"{name}: {' → '.join(registry.title(s) for s in chain)} of {base.label}"
    model_ref = repo_id or out.name
    data = _card_data(
        _redacted(base),
        fmt,
        redact_text(f"{name}-{stage}"),
        chain,
        methods,
        [redact_text(d) for d in _hub_datasets(run, chain)],
        metrics.get(stage, {}),
    )
    base_line = (
        f"[{base.hub_id}](https://huggingface.co/{base.hub_id})"
        if base.hub_id
        else f"`{base.label}` (a local model folder, not on the Hub: `base_model` is left out of the "
        "metadata)"
    )
    body = [f"# {title}", ""]
    if project.get("goal"):
        body += [f"Goal: {project['goal']}", ""]
    body += [
        f"Fine-tuned from {base_line} with [tunepipe](https://pypi.org/project/tunepipe/), "
        "each stage starting from the result of the one before:",
        "",
        *(f"{i}. {_stage_line(s)}" for i, s in enumerate(chain, 1)),
        "",
        f"Weights: one GGUF file ({_gguf_quant(out)}) for llama.cpp and Ollama."
        if fmt == "gguf"
        else "Weights: safetensors with the adapters merged in; the tokenizer carries the chat template.",
        "",
        "## Training",
        "",
        _markdown(_training_rows(run, raw, chain)),
        "",
    ]
    tr = raw.get("training") or {}
    dcfg = raw.get("data") or {}
    body += [
        f"Batch: per-device micro-batch × gradient accumulation. Shared settings: warmup ratio "
        f"{_value(tr.get('warmup_ratio', '?'))}, {tr.get('lr_scheduler_type', '?')} schedule, weight decay "
        f"{_value(tr.get('weight_decay', '?'))}, optimizer {tr.get('optim', '?')}, "
        f"seed {tr.get('seed', '?')}; "
        f"sequences up to {dcfg.get('max_length', '?')} tokens ({dcfg.get('truncation', '?')} longer ones).",
        "",
    ]
    data_rows = _data_rows(run, chain)
    body += ["## Data", ""]
    body += [_markdown(data_rows) if data_rows else "_the run folder has no data statistics_", ""]
    body += ["## Evaluation", ""]
    if metrics:
        body += [
            _markdown(metrics_table(metrics)),
            "",
            "Higher is better except where marked ↓ (loss, perplexity). Δ columns: each model minus the one "
            "it was trained from; ⚠ marks a metric that got worse.",
            "",
        ]
    else:
        body += ["_not evaluated: the run has no eval/metrics.json_", ""]
    total = sum(
        (run.pipeline.get("stages", {}).get(s, {}).get("seconds") or 0.0)
        for s in run.pipeline.get("stages", {})
    )
    body += [
        "## Time and hardware",
        "",
        f"Hardware: {_hardware(run.env)}. Total time {_duration(total)}.",
        "",
        _markdown(stage_time_table(run, cfg)),
        "",
        "## How to use",
        "",
        *_usage(fmt, model_ref, _example_prompt(run, stage), out),
        "",
        "## Limitations",
        "",
        *(f"- {line}" for line in _limitations(run, chain, stage, run.metrics)),
        "",
        "## License",
        "",
    ]
    if base.license:
        body.append(f"`{base.license}`, from {base.license_source}; check that it allows your use.")
    else:
        body.append(
            "`other`: tunepipe could not find the base model's license offline. Set `license:` in the "
            "metadata above to the base model's license (and `license_name` / `license_link` for a custom "
            "one) before you publish this model."
        )
    text = f"---\n{data.to_yaml()}\n---\n\n" + redact_text("\n".join(body)) + "\n"
    _check(text)
    return text


def _check(text: str) -> None:
    """The card parses as a Hugging Face model card (locally: ModelCard.validate would call the Hub)."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as e:
        raise ModelCardError(f"the model card metadata does not parse: {e}") from e
    if not card.data.to_dict().get("license"):
        raise ModelCardError("the model card has no license field")


def write_model_card(
    cfg: Config, run_dir: Path, stage: str, out: Path, fmt: str = "hf", repo_id: str | None = None
) -> Path:
    """Write out/README.md, the model card of the `stage` model exported to `out`; returns its path.
    `repo_id` (the Hub repo it goes to, when known) is used in the usage snippet."""
    text = model_card_text(cfg, run_dir, stage, out, fmt, repo_id)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CARD_NAME
    tmp = path.with_name(f".{CARD_NAME}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
