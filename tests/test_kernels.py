"""training.liger_kernel: liger-kernel's fused kernels go into the trained model on a CUDA GPU when the
package is installed, never on CPU, and the LM head stays TRL's fused one.

liger-kernel's kernels are Triton GPU kernels: they cannot run on this CPU-only machine, so the test of
`apply_fused_kernels` puts a stand-in `liger_kernel` package on sys.path that records the call (a mock,
for that reason only). The real kernels run in scripts/gpu_check.py on a GPU."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT

from tunepipe.config import load_config
from tunepipe.modeling import Plan, apply_fused_kernels, liger_decision

QWEN = ROOT / "examples" / "qwen3-4b-sft-dpo.yaml"


def test_decision_per_setting_device_and_installation() -> None:
    assert liger_decision("auto", "cuda", installed=True)[0] is True
    assert liger_decision(True, "cuda", installed=True)[0] is True
    off_cpu = liger_decision("auto", "cpu", installed=True)
    assert off_cpu[0] is False and "no CUDA GPU" in off_cpu[1]
    assert liger_decision(True, "cpu", installed=True)[0] is False  # never on CPU, even when asked
    missing = liger_decision("auto", "cuda", installed=False)
    assert missing[0] is False and "pip install liger-kernel" in missing[1]
    assert liger_decision(False, "cuda", installed=True) == (False, "off: set in training.liger_kernel")


@pytest.fixture
def fake_liger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict]]:
    pkg = _stand_in(
        tmp_path,
        monkeypatch,
        "CALLS = []\n\ndef _apply_liger_kernel_to_instance(model, **kwargs):\n"
        "    CALLS.append({'model': model, **kwargs})\n",
    )
    # liger's table of supported architectures (the real one has ~40)
    (pkg / "monkey_patch.py").write_text("MODEL_TYPE_TO_APPLY_LIGER_FN = {'qwen3': None, 'llama': None}\n")
    import liger_kernel.transformers as lt

    yield lt.CALLS
    for name in MODULES:  # later tests must not find the stand-in
        sys.modules.pop(name, None)


MODULES = ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch")


def _stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transformers_init: str) -> Path:
    """A `liger_kernel` package on sys.path whose `transformers/__init__.py` is `transformers_init`."""
    pkg = tmp_path / "liger_kernel" / "transformers"
    pkg.mkdir(parents=True)
    (tmp_path / "liger_kernel" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(transformers_init)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    return pkg


def _model(model_type: str = "qwen3") -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(model_type=model_type))


def test_applied_on_a_gpu_plan_with_the_lm_head_left_to_trl(tmp_path: Path, fake_liger: list[dict]) -> None:
    cfg = load_config(QWEN)
    model, lines = _model(), []
    gpu = Plan("cuda", "sdpa", "", "bfloat16", False, "GPU")
    assert apply_fused_kernels(model, cfg, gpu, log=lines.append) is True
    assert fake_liger == [{"model": model, "fused_linear_cross_entropy": False, "cross_entropy": False}]
    assert any("RMSNorm, RoPE and SwiGLU" in line for line in lines)

    cpu = Plan("cpu", "sdpa", "", "float32", True, "CPU")
    assert apply_fused_kernels(model, cfg, cpu, log=lines.append) is False
    off = load_config(QWEN, ["training.liger_kernel=false"])
    assert apply_fused_kernels(model, off, gpu, log=lines.append) is False
    assert len(fake_liger) == 1


def test_asked_for_on_cpu_says_it_runs_without(fake_liger: list[dict]) -> None:
    cfg = load_config(QWEN, ["training.liger_kernel=true"])
    lines: list[str] = []
    cpu = Plan("cpu", "sdpa", "", "float32", True, "CPU")
    assert apply_fused_kernels(_model(), cfg, cpu, log=lines.append) is False
    assert fake_liger == []
    assert lines == [
        "training.liger_kernel: true, but liger-kernel's kernels are Triton GPU kernels and this run has "
        "no CUDA GPU: training without it"
    ]


def test_doctor_prints_the_kernel_decision_and_warns_when_asked_for_on_cpu() -> None:
    from tunepipe.doctor import config_report, run_doctor

    lines: list[str] = []
    run_doctor(ROOT / "examples" / "quickstart.yaml", [], False, lines.append)
    text = "\n".join(lines)
    assert text.count("fused kernels    none: liger-kernel's kernels are Triton GPU kernels") == 2
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", ["training.liger_kernel=true"])
    warn = {c["name"]: c for c in config_report(cfg)["incompatibilities"]}["liger-kernel"]
    assert warn["status"] == "warn" and not warn["blocking"] and "training.liger_kernel: auto" in warn["fix"]


def test_an_architecture_liger_does_not_know_is_skipped_and_said(fake_liger: list[dict]) -> None:
    lines: list[str] = []
    gpu = Plan("cuda", "sdpa", "", "bfloat16", False, "GPU")
    assert apply_fused_kernels(_model("gpt2"), load_config(QWEN), gpu, log=lines.append) is False
    assert fake_liger == [] and lines == [
        "kernels: liger-kernel has no kernels for model type 'gpt2'; training without them"
    ]


def test_a_liger_that_does_not_import_is_skipped_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stand_in(tmp_path, monkeypatch, "raise ImportError('triton: undefined symbol')\n")
    lines: list[str] = []
    gpu = Plan("cuda", "sdpa", "", "bfloat16", False, "GPU")
    try:
        assert apply_fused_kernels(_model(), load_config(QWEN), gpu, log=lines.append) is False
    finally:
        for name in MODULES:
            sys.modules.pop(name, None)
    assert lines == [
        "kernels: liger-kernel does not import (ImportError: triton: undefined symbol); training without it"
    ]


def test_doctor_planning_a_gpu_run_elsewhere_says_liger_depends_on_the_gpu_machine() -> None:
    """This machine has no liger-kernel: for the GPU target the plan can only say what decides."""
    import importlib.util

    from tunepipe.doctor import config_report

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here: the plan then says it is on")
    for setting in ("auto", "true"):
        report = config_report(load_config(QWEN, [f"training.liger_kernel={setting}"]))
        kernels = report["stages"]["sft"]["kernels"]
        assert kernels["value"] == "liger where installed" and "pip install liger-kernel" in kernels["reason"]
        assert "liger-kernel" not in {c["name"] for c in report["incompatibilities"]}
    off = config_report(load_config(QWEN, ["training.liger_kernel=false"]))["stages"]["dpo"]["kernels"]
    assert off == {"value": "none", "enabled": False, "reason": "set in training.liger_kernel"}


def test_an_error_while_patching_stops_the_stage_naming_the_setting(fake_liger: list[dict]) -> None:
    import liger_kernel.transformers as lt

    def broken(model, **kwargs):
        raise AttributeError("module 'transformers.models.qwen3' has no attribute 'Qwen3MLP'")

    lt._apply_liger_kernel_to_instance = broken
    gpu = Plan("cuda", "sdpa", "", "bfloat16", False, "GPU")
    with pytest.raises(RuntimeError, match=r"Qwen3MLP'\); set training.liger_kernel: false"):
        apply_fused_kernels(_model(), load_config(QWEN), gpu, log=lambda _m: None)
