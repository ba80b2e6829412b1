"""LCA uncertainty in evaluation: the AUROC and U_LCA math, the log-likelihoods against a plain
transformers forward pass, `lca_evaluation` end to end on a tiny saved model, and `kdray eval --lca-samples`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from kdray.cli import main
from kdray.eval.evaluate import greedy_generations
from kdray.eval.metrics import answer_entropy, auroc, extract_answer, lca_uncertainty
from kdray.eval.uncertainty import generate_scored, lca_evaluation, lca_rows, lca_summary

NEW_TOKENS = 6


def save_digit_model(path: Path, seed: int = 0) -> Path:
    """A tiny real Llama whose tokenizer knows only the digits (and the special tokens): every output is
    a number, so exact-match answers exist. The special tokens' output rows are zeroed, so the greedy
    token is a digit (one of ten random logits beats 0) while sampling still emits EOS now and then."""
    import torch

    from kdray.models.tiny import tiny_causal_lm
    from kdray.models.tokenizer import SPECIAL_TOKENS, char_tokenizer

    tokenizer = char_tokenizer("0123456789")
    model = tiny_causal_lm(len(tokenizer), hidden_size=32, num_layers=1, seed=seed)
    with torch.no_grad():
        model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0.0
    for config in (model.config, model.generation_config):
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def digit_model(tmp_path_factory) -> Path:
    return save_digit_model(tmp_path_factory.mktemp("digits") / "model")


def half_right_records(model: Path, n: int = 8) -> list[dict]:
    """Generated arithmetic prompts whose answers are the model's own greedy answers on even rows and a
    different number on odd rows: greedy accuracy is exactly 1/2 and both AUROC classes exist."""
    from kdray.data import read_records

    records = read_records("arithmetic", None, split="test", limit=n).records
    texts = greedy_generations(model, [r["prompt"] for r in records], max_new_tokens=NEW_TOKENS)
    answers = [extract_answer(t) for t in texts]
    assert all(a is not None for a in answers), f"the digit model answered without a number: {texts}"
    for i, (r, a) in enumerate(zip(records, answers, strict=True)):
        r["answer"] = a if i % 2 == 0 else a + "9"
        r["response"] = f"#### {r['answer']}"
    return records


# ------------------------------------------------------------------------------------------ the math


def test_auroc_matches_a_brute_force_pairwise_count_and_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 40))
        scores = np.round(rng.normal(size=n), 1)  # rounded: ties happen and count half
        labels = rng.random(n) < 0.4
        labels[trial % n] = not labels[(trial + 1) % n]  # both classes present
        pos, neg = scores[labels], scores[~labels]
        pairs = [1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg]
        assert auroc(scores, labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
        assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert math.isnan(auroc([0.3, 0.1], [False, False]))


def test_u_lca_by_hand_and_under_a_loglik_shift():
    # π ∝ exp(ℓ): samples (1, 1, 2) with weights 1:1:2 -> P_s = {1: 1/2, 2: 1/2, 3: 0}; the greedy "3"
    # with weight 4 -> P_anchor = {1: 1/4, 2: 1/4, 3: 1/2}; KL = 2 · 1/2 · log 2 = log 2 (eps aside)
    u = lca_uncertainty(["1", "1", "2"], [0.0, 0.0, math.log(2)], "3", math.log(4))
    assert u == pytest.approx(math.log(2), abs=1e-4)
    # at τ = 2 the weights are square roots, samples (1, 1, √2) and greedy 2: both clusters of the
    # samples lose the same share to the greedy one, so KL = log((4 + √2) / (2 + √2))
    u2 = lca_uncertainty(["1", "1", "2"], [0.0, 0.0, math.log(2)], "3", math.log(4), temperature=2.0)
    assert u2 == pytest.approx(math.log((4 + 2**0.5) / (2 + 2**0.5)), abs=1e-4)
    # Gibbs probabilities are normalised: adding a constant to every ℓ changes nothing
    shifted = lca_uncertainty(["1", "1", "2"], [-5.0, -5.0, math.log(2) - 5], "3", math.log(4) - 5)
    assert shifted == pytest.approx(u, abs=1e-9)


def _row(sample_answers: list[str], greedy: str, correct: bool) -> dict:
    logliks = [-1.0] * len(sample_answers)
    return {
        "correct": correct,
        "u_lca": lca_uncertainty(sample_answers, logliks, greedy, -1.0),
        "u_entropy": answer_entropy(sample_answers),
        "u_loglik": 1.0 if correct else 2.0,  # −ℓ(greedy): the wrong ones are less likely
    }


def test_confident_correct_against_uncertain_wrong_gives_auroc_one_and_reversed_zero():
    confident = [_row(["7"] * 6, "7", True), _row(["12"] * 5 + ["13"], "12", True)]
    uncertain = [
        _row(["3", "4", "5", "6", "3", "8"], "3", False),
        _row(["9", "1", "2", "5", "6", "9"], "4", False),
    ]
    summary = lca_summary(confident + uncertain)
    for key in ("lca_auroc", "entropy_auroc", "loglik_auroc"):
        assert summary[key] == 1.0, key
    assert summary["greedy_accuracy"] == 0.5 and summary["prompts"] == 4
    # the same scores with the labels swapped rank every wrong answer below every right one
    swapped = [{**r, "correct": not r["correct"]} for r in confident + uncertain]
    for key in ("lca_auroc", "entropy_auroc", "loglik_auroc"):
        assert lca_summary(swapped)[key] == 0.0, key
    # one class only: no AUROC, rather than a made-up number
    assert math.isnan(lca_summary(confident)["lca_auroc"])


# ------------------------------------------------------------------------------- log-likelihoods


def test_logliks_agree_with_a_plain_forward_pass(digit_model):
    import torch
    from transformers import AutoModelForCausalLM

    from kdray.teacher import Teacher

    prompts = ["12 + 30 =", "7 * 8 ="]
    scorer = Teacher(str(digit_model), top_k=1)
    sampled = generate_scored(scorer, prompts, n=3, temperature=1.0, max_new_tokens=NEW_TOKENS, seed=0)
    greedy = generate_scored(scorer, prompts, n=1, temperature=0.0, max_new_tokens=NEW_TOKENS, seed=0)
    lm = AutoModelForCausalLM.from_pretrained(digit_model).eval()
    for outs, is_greedy in ((sampled, False), (greedy, True)):
        for o in (o for per in outs for o in per):
            ids = torch.tensor([o["prompt_ids"] + o["token_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(lm(ids).logits[0, :-1].float(), dim=-1)
            start = len(o["prompt_ids"]) - 1  # row t predicts token t + 1
            rows = logp[start:]
            token_lp = rows.gather(-1, ids[0, start + 1 :, None]).squeeze(-1)
            assert o["loglik"] == pytest.approx(float(token_lp.mean()), abs=1e-5)
            if is_greedy:  # and greedy really is the argmax at every generated position
                assert rows.argmax(-1).tolist() == o["token_ids"]


# ---------------------------------------------------------------------------------- end to end


def test_lca_evaluation_end_to_end_is_seeded_and_scores_the_greedy_answer(digit_model):
    records = half_right_records(digit_model)
    kwargs = {"samples": 4, "temperature": 1.0, "max_new_tokens": NEW_TOKENS, "seed": 3}
    rows = lca_rows(digit_model, records, **kwargs)
    first = lca_summary(rows)
    assert first == lca_evaluation(digit_model, records, **kwargs)  # seeded: identical numbers
    assert first["greedy_accuracy"] == 0.5 and first["prompts"] == len(records)
    for key in ("lca_auroc", "entropy_auroc", "loglik_auroc"):
        assert 0.0 <= first[key] <= 1.0, (key, first[key])
    # the per-prompt scores are the documented ones, recomputed from the row's own samples
    for r in rows:
        assert r["u_lca"] >= 0 and len(r["sample_answers"]) == 4
        assert r["u_entropy"] == answer_entropy(r["sample_answers"]) and r["u_loglik"] == -r["greedy_loglik"]
    # another seed draws other samples
    other = lca_rows(digit_model, records, **{**kwargs, "seed": 4})
    assert [r["sample_logliks"] for r in other] != [r["sample_logliks"] for r in rows]
    assert [r["greedy"] for r in other] == [r["greedy"] for r in rows]


def test_lca_evaluation_refuses_records_without_answers(digit_model):
    records = [{"prompt": "Translate: a cat", "response": "eine Katze", "answer": None, "id": "t:1"}]
    with pytest.raises(ValueError, match=r"record 0 \(id 't:1'\) has none"):
        lca_evaluation(digit_model, records, max_new_tokens=NEW_TOKENS)


# --------------------------------------------------------------------------------------- the CLI


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_prints_the_lca_table_with_the_numbers_of_lca_evaluation(digit_model, tmp_path, capsys):
    records = half_right_records(digit_model, n=6)
    rows = [{"question": r["prompt"], "answer": f"#### {r['answer']}"} for r in records]
    data = _write_jsonl(tmp_path / "questions.jsonl", rows)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data:\n  task: arithmetic\n  format: generated\nworkflow:\n  eval_max_new_tokens: {NEW_TOKENS}\n"
    )
    assert (
        main(["eval", str(digit_model), "--config", str(cfg), "--data", str(data), "--lca-samples", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert "| model (arithmetic, 6 prompts, 2 samples) | LCA AUROC | entropy AUROC | loglik AUROC |" in out
    (line,) = [x for x in out.splitlines() if x.startswith(f"| {digit_model} |") and x.count("|") == 6]
    cells = [float(c) for c in line.strip("| ").split("|")[1:]]
    expected = lca_evaluation(digit_model, records, samples=2, max_new_tokens=NEW_TOKENS, seed=0)
    keys = ("lca_auroc", "entropy_auroc", "loglik_auroc", "greedy_accuracy")
    assert cells == [float(f"{expected[k]:.3f}") for k in keys]
    assert cells[3] == 0.5
    # the main table scored the same file: half of the greedy answers are right
    assert re.search(rf"\| {re.escape(str(digit_model))} \| 50\.00 \|", out)
    # --lca-samples 0 turns the second table off
    assert (
        main(["eval", str(digit_model), "--config", str(cfg), "--data", str(data), "--lca-samples", "0"]) == 0
    )
    assert "LCA AUROC" not in capsys.readouterr().out


# ------------------------------------------------------------------------------- config and workflow


def test_config_refuses_negative_samples_and_a_non_positive_temperature():
    from kdray.config import Config, ConfigError, with_overrides

    assert with_overrides(Config(), {"workflow.lca_samples": 0}).workflow.lca_samples == 0  # 0 = off
    for key, value, allowed in (
        ("workflow.lca_samples", -1, "allowed: >= 0"),
        ("workflow.lca_temperature", 0.0, "allowed: > 0"),
        ("workflow.lca_samples", 2.5, "expected an integer"),
    ):
        with pytest.raises(ConfigError, match=re.escape(key)) as err:
            with_overrides(Config(), {key: value})
        assert allowed in str(err.value), str(err.value)


def test_the_evaluate_step_adds_the_lca_table_for_both_students(digit_model, tmp_path):
    from kdray.config import Config, with_overrides
    from kdray.workflow import StepContext, StepResult, evaluate_step, step_key

    records = half_right_records(digit_model, n=4)
    _write_jsonl(tmp_path / "eval.jsonl", records)
    cfg = with_overrides(
        Config(),
        {"workflow.eval_max_new_tokens": NEW_TOKENS, "workflow.lca_samples": 2, "workflow.samples": 1},
    )
    ctx = StepContext("evaluate", "k", tmp_path, cfg, tracker=None)

    def result(step: str, **outputs: str) -> StepResult:
        return StepResult(step, step, str(tmp_path), outputs, False, 0.0)

    out = evaluate_step(
        ctx, result("data", eval=str(tmp_path / "eval.jsonl")), result("teacher", path=str(digit_model)),
        result("distill", student=str(digit_model)), result("baseline", student=str(digit_model)),
    )  # fmt: skip
    assert set(out["lca"]) == {"baseline", "student"}
    # the same model and seed twice: the same numbers, and the greedy accuracy of the constructed answers
    assert out["lca"]["baseline"] == out["lca"]["student"] and out["lca"]["student"]["greedy_accuracy"] == 0.5
    table = (tmp_path / "table.md").read_text()
    assert "LCA AUROC" in table and "| student (SFT only) |" in table and "| student (xkd) |" in table
    # the same model as both students: a lead of exactly 0 on the same prompts, said in words
    assert out["lead"] == {
        "model": "student (xkd)",
        "lead": 0.0,
        "lead_lo": 0.0,
        "lead_hi": 0.0,
        "prompts": 4.0,
    }
    assert "student (xkd) ties student (SFT only) by +0.0 exact-match points on the same 4 problems" in table
    assert "within this evaluation's noise" in table
    rows = [json.loads(x) for x in (tmp_path / "lca_student.jsonl").read_text().splitlines()]
    assert len(rows) == len(records) and sum(r["correct"] for r in rows) == 2
    # the LCA settings are part of the step's cache key: changing them re-runs the evaluation
    changed = with_overrides(cfg, {"workflow.lca_samples": 4})
    assert step_key("evaluate", cfg, []) != step_key("evaluate", changed, [])
    assert step_key("evaluate", cfg, []) != step_key(
        "evaluate", with_overrides(cfg, {"workflow.lca_temperature": 0.7}), []
    )
