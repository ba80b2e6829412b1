"""Method declarations: one per method, read by the config, the CLI, the trainer and the docs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdray.cli import main
from kdray.config import load_config
from kdray.losses import TERMS
from kdray.methods import METHODS, get_method
from kdray.methods.table import methods_markdown

REPO = Path(__file__).resolve().parents[1]


def test_methods_json_lists_every_declared_method_with_resolved_terms(capsys):
    assert main(["methods", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == list(METHODS)
    for r in records:
        assert {"name", "terms", "needs", "tokenizer", "reference"} <= set(r)
        for term in r["terms"]:
            assert term["name"] in TERMS and set(term["params"]) <= TERMS[term["name"]].params
    gkd = next(r for r in records if r["name"] == "gkd")
    assert gkd["terms"][0]["params"]["beta"] == 0.5 and gkd["on_policy_fraction"] == 0.5
    # parameters the declaration leaves out are shown at the term's own default
    assert gkd["terms"][0]["params"]["sparse_mode"] == "tail"


def test_every_method_builds_its_own_objective_from_its_declaration():
    from kdray.losses import build_objective

    for name, method in METHODS.items():
        pairs = ["data.preferences=true"] if method.pairs else []  # a pair method refuses demonstrations
        cfg = load_config(None, [f"objective.method={name}", *pairs])
        assert [t.name for t in cfg.objective.terms] == [t["name"] for t in method.terms], name
        objective = build_objective(cfg.objective.terms)
        assert objective.needs_teacher == bool(method.needs & {"topk_logprobs", "sample_scores"}), name
        assert cfg.objective.method_params == dict(method.params)


def test_gkd_alone_resolves_to_jsd_half_with_lambda_half():
    cfg = load_config(None, ["objective.method=gkd"])
    (term,) = cfg.objective.terms
    assert (term.name, term.params["beta"], cfg.objective.on_policy_fraction) == ("jsd", 0.5, 0.5)


def config_cli(tmp_path, text, *extra):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "kdray.cli", "config", str(path), *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


@pytest.mark.parametrize("method", ["ppad", "ava", "gdk"])
def test_an_undeclared_method_exits_2_naming_the_valid_ones(tmp_path, method):
    out = config_cli(tmp_path, f"objective:\n  method: {method}\n")
    assert out.returncode == 2
    assert all(name in out.stderr for name in METHODS)
    if method == "gdk":
        assert "did you mean 'gkd'" in out.stderr


def test_a_misspelt_term_parameter_or_unknown_term_exits_2(tmp_path):
    out = config_cli(
        tmp_path, "objective:\n  method: gkd\n  terms:\n    - name: jsd\n      params: {betta: 0.3}\n"
    )
    assert out.returncode == 2 and "did you mean 'beta'" in out.stderr
    out = config_cli(tmp_path, "objective:\n  terms:\n    - name: forward_kll\n")
    assert out.returncode == 2 and "did you mean 'forward_kl'" in out.stderr
    out = config_cli(tmp_path, "objective:\n  method: taid\n  method_params: {t_strat: 0.2}\n")
    assert out.returncode == 2 and "did you mean 't_start'" in out.stderr


def test_config_resolved_prints_the_method_and_its_terms(tmp_path):
    out = config_cli(tmp_path, "objective:\n  method: minillm\n", "--resolved")
    assert out.returncode == 0, out.stderr
    assert (
        "# method minillm" in out.stdout and "ppo_epochs: 4" in out.stdout and "name: minillm" in out.stdout
    )
    assert "teacher serves at temperature 1" in out.stdout


def test_minillm_trains_on_student_samples_at_temperature_one_only():
    from kdray.config import ConfigError
    from kdray.validate import validate_config

    with pytest.raises(ConfigError, match="on_policy_fraction"):
        load_config(None, ["objective.method=minillm", "objective.on_policy_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"set objective\.sampling_temperature: 1\.0"):
        validate_config(load_config(None, ["objective.method=minillm", "objective.sampling_temperature=0.7"]))


def test_the_docs_are_generated_from_the_declarations():
    doc = (REPO / "docs" / "methods.md").read_text()
    assert doc == methods_markdown(), (
        "docs/methods.md is stale: python -m kdray.methods.table > docs/methods.md"
    )
    for method in METHODS.values():
        for line in method.deviations:
            assert line in doc


def test_the_preflight_reads_the_tokenizer_rule():
    from kdray.models.tokenizer import char_tokenizer
    from kdray.teacher import VocabularyMismatchError, check_vocabularies

    a, b = char_tokenizer("abc"), char_tokenizer("abcd")
    with pytest.raises(VocabularyMismatchError, match="seqkd"):
        check_vocabularies(a, b, teacher_head=len(a), student_head=len(b), method="gkd")
    assert get_method("seqkd").text_only
    check_vocabularies(a, b, teacher_head=len(a), student_head=len(b), method="seqkd")
