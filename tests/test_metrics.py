"""Every generation metric on fixed inputs, user scorers, and the eval-set config rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunepipe.config import ConfigError, load_config
from tunepipe.metrics import (
    contains,
    exact_match,
    load_user_scorer,
    numeric_match,
    regex_match,
    rouge_l,
    score,
    scorer_for,
    strip_thinking,
)


def test_exact_match_ignores_surrounding_whitespace_but_not_case() -> None:
    assert exact_match("  12/03/2024\n", "12/03/2024") == 1.0
    assert exact_match("a  b", "a b") == 1.0
    assert exact_match("Paris", "paris") == 0.0
    assert exact_match("12/03/2024.", "12/03/2024") == 0.0


def test_contains_finds_the_reference_inside_a_sentence() -> None:
    assert contains("The capital is Paris.", "paris") == 1.0
    assert contains("The capital is Lyon.", "Paris") == 0.0


def test_regex_match_extracts_then_compares() -> None:
    pattern = r"answer is (\d+)"
    assert regex_match("I think the answer is 42.", "42", pattern) == 1.0
    assert regex_match("the answer is 41", "42", pattern) == 0.0
    assert regex_match("no number here", "42", pattern) == 0.0
    # GSM8K style: the reference carries the pattern too, so both sides are extracted.
    assert regex_match("... so the answer is 7", "3 + 4 = 7, the answer is 7", pattern) == 1.0
    # Without a group the whole match is the answer.
    assert regex_match("result: 12 apples", "12", r"\d+") == 1.0


def test_numeric_match_reads_the_last_number_with_tolerance() -> None:
    assert numeric_match("The sum is 1,549.", "1549") == 1.0
    assert numeric_match("about 3.14159", "3.1416", tolerance=1e-3) == 1.0
    assert numeric_match("about 3.14159", "3.1416", tolerance=1e-6) == 0.0
    assert numeric_match("first 5 then -2", "-2") == 1.0
    assert numeric_match("2.5e3 grams", "2500") == 1.0
    assert numeric_match("no digits", "7") == 0.0


def test_rouge_l_is_the_lcs_f1() -> None:
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("completely different words", "the cat sat") == 0.0
    # LCS("the cat was on the mat", "the cat sat on the mat") = 5 words of 6 each: P = R = 5/6.
    assert rouge_l("the cat was on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # P = 2/2, R = 2/4 -> F1 = 2/3.
    assert rouge_l("cat mat", "the cat the mat") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0


def test_strip_thinking_removes_closed_and_unterminated_blocks() -> None:
    assert strip_thinking("<think>\nlet me see\n</think>\n\n42") == "42"
    assert strip_thinking("<think>cut by max_new_tokens") == ""
    assert strip_thinking("no think here") == "no think here"


def test_user_scorer_is_imported_from_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "myscorers.py").write_text(
        "def first_word(prediction, reference):\n    return prediction.split()[:1] == reference.split()[:1]\n"
    )
    fn = load_user_scorer("myscorers:first_word", tmp_path)
    assert score(fn, "yes indeed", "yes") == 1.0 and score(fn, "no", "yes") == 0.0
    with pytest.raises(ValueError, match="has no function"):
        load_user_scorer("myscorers:missing", tmp_path)
    with pytest.raises(ValueError, match="cannot import"):
        load_user_scorer("not_a_module_anywhere:f", tmp_path)
    (tmp_path / "bad.py").write_text("def f(prediction, reference):\n    return None\n")
    with pytest.raises(ValueError, match="return a number"):
        score(load_user_scorer("bad:f", tmp_path), "a", "b")
    assert scorer_for("numeric_match", regex=None, tolerance=0.5, base_dir=tmp_path)("9.6", "10") == 1.0


def _cfg(tmp_path: Path, eval_section: str) -> Path:
    p = tmp_path / "tunepipe.yaml"
    p.write_text("eval:\n" + eval_section)
    return p


def test_eval_set_config_rules(tmp_path: Path) -> None:
    cfg = load_config(_cfg(tmp_path, "  sets: [sft_eval]\n  metrics: [exact_match, perplexity]\n"))
    assert cfg.eval.sets[0].name == "sft_eval" and cfg.eval.sets[0].source == "sft_eval"
    with pytest.raises(ConfigError, match="did you mean 'exact_match'"):
        load_config(_cfg(tmp_path, "  metrics: [exact_mach]\n"))
    with pytest.raises(ConfigError, match="regex_match needs `regex`"):
        load_config(_cfg(tmp_path, "  sets: [{name: s, metrics: [regex_match]}]\n"))
    with pytest.raises(ConfigError, match="does not compile"):
        load_config(_cfg(tmp_path, "  sets: [{name: s, metrics: [regex_match], regex: '(unclosed'}]\n"))
    with pytest.raises(ConfigError, match="must be unique"):
        load_config(_cfg(tmp_path, "  sets: [sft_eval, {name: sft_eval, source: dpo_eval}]\n"))
    ok = load_config(_cfg(tmp_path, "  metrics: ['scorers:answer_only']\n"))
    assert ok.eval.metrics == ["scorers:answer_only"]


def test_default_eval_models_follow_the_enabled_stages(tmp_path: Path) -> None:
    p = tmp_path / "tunepipe.yaml"
    p.write_text("dpo: {enabled: false}\n")
    assert load_config(p).eval.models == ["base", "sft"]
    p.write_text("dpo: {enabled: false}\neval: {models: [base, dpo]}\n")
    with pytest.raises(ConfigError, match="dpo.enabled is false"):
        load_config(p)
