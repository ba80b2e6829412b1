"""`kdray eval --data PATH`: a jsonl file in the task's own fields is scored instead of the config's held-out
split, and a bad row is refused with its file, row number and field (exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_eval_lca import save_digit_model

from kdray.cli import main
from kdray.data.records import DEFAULT_PREFIXES
from kdray.eval.evaluate import greedy_generations
from kdray.eval.metrics import extract_answer
from kdray.models.tiny import save_tiny_checkpoint

NEW_TOKENS = 6


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _config(path: Path, task: str) -> Path:
    # the config's own data is the generated arithmetic split: --data must replace it, not add to it
    path.write_text(
        f"data:\n  task: {task}\n  source: null\n  format: auto\n  eval_examples: 50\n"
        f"workflow:\n  eval_max_new_tokens: {NEW_TOKENS}\n  lca_samples: 0\n"
    )
    return path


def _row(out: str, model: Path) -> list[str]:
    (line,) = [x for x in out.splitlines() if x.startswith(f"| {model} |")]
    return [c.strip() for c in line.strip("|").split("|")[1:]]


def test_arithmetic_questions_are_scored_against_the_files_answers(tmp_path, capsys):
    model = save_digit_model(tmp_path / "digits")
    questions = [
        "Tom has 3 apples and buys 4 more.",
        "Mia has 12 pens.",
        "Sam has 9 eggs.",
        "Ana has 20 cards.",
    ]
    texts = greedy_generations(model, questions, max_new_tokens=NEW_TOKENS)
    answers = [extract_answer(t) for t in texts]
    assert all(a is not None for a in answers), texts
    # three of four answers are the model's own: 75% exact match, whatever the model says
    finals = [answers[0], answers[1], answers[2], answers[3] + "1"]
    rows = [
        {"question": q, "answer": f"Some steps.\n#### {a}"} for q, a in zip(questions, finals, strict=True)
    ]
    data = _jsonl(tmp_path / "questions.jsonl", rows)
    cfg = _config(tmp_path / "cfg.yaml", "arithmetic")
    assert main(["eval", str(model), "--config", str(cfg), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"scored on {data} (4 records)" in out
    assert "| model (arithmetic, 4 held-out) | exact_match |" in out
    assert _row(out, model)[0] == "75.00"
    assert main(["eval", str(model), "--config", str(cfg), "--data", str(data), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "(arithmetic, 2 held-out)" in out and _row(out, model)[0] == "100.00"


def test_translation_pairs_are_scored_with_bleu_and_lca_says_it_does_not_apply(tmp_path, capsys):
    import sacrebleu

    model = save_tiny_checkpoint(tmp_path / "m", hidden_size=32, num_layers=1, seed=0)
    sources = ["A dog runs.", "Two men sit on a bench.", "A girl reads a book.", "The sun is shining."]
    prompts = [DEFAULT_PREFIXES["translation"] + s for s in sources]
    texts = greedy_generations(model, prompts, max_new_tokens=NEW_TOKENS)
    assert all(t.strip() for t in texts[:2]), texts
    # two targets are the model's own outputs and two are real German, so BLEU is neither 0 nor 100
    targets = [texts[0], texts[1], "Ein Mädchen liest ein Buch.", "Die Sonne scheint."]
    data = _jsonl(
        tmp_path / "pairs.jsonl", [{"source": s, "target": t} for s, t in zip(sources, targets, strict=True)]
    )
    cfg = _config(tmp_path / "cfg.yaml", "translation")
    assert main(["eval", str(model), "--config", str(cfg), "--data", str(data), "--lca-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "| model (translation, 4 held-out) | bleu |" in out
    expected = sacrebleu.corpus_bleu(texts, [targets]).score
    assert 0 < expected < 100
    assert _row(out, model)[0] == f"{expected:.2f}"
    assert "LCA uncertainty: does not apply to the translation task" in out and "LCA AUROC" not in out


@pytest.mark.parametrize(
    ("task", "lines", "row", "needle"),
    [
        ("arithmetic", [{"question": "Q1", "answer": "#### 1"}, {"question": "Q2"}], 2, "field 'answer'"),
        (
            "arithmetic",
            [{"question": "Q1", "answer": "#### 1"}, '{"question": "Q2", "answer"'],
            2,
            "not valid JSON",
        ),
        (
            "arithmetic",
            [
                {"question": "Q1", "answer": "#### 1"},
                {"question": "Q2", "answer": "#### 2"},
                {"question": "Q3", "answer": "3"},
            ],
            3,
            "'####",
        ),
        ("translation", [{"source": "a", "target": "b"}, {"source": "c", "target": ""}], 2, "field 'target'"),
        ("translation", [{"source": "a", "target": "b"}, {"source": "c", "tgt": "d"}], 2, "add a 'target'"),
    ],
)
def test_a_bad_row_is_refused_with_file_row_and_field(tmp_path, capsys, task, lines, row, needle):
    model = save_tiny_checkpoint(tmp_path / "m", hidden_size=32, num_layers=1, seed=0)
    data = _jsonl(tmp_path / "bad.jsonl", lines)
    cfg = _config(tmp_path / "cfg.yaml", task)
    assert main(["eval", str(model), "--config", str(cfg), "--data", str(data)]) == 2
    captured = capsys.readouterr()
    assert f"{data}:{row}: malformed row" in captured.err and needle in captured.err
    assert "exact_match" not in captured.out and "bleu" not in captured.out  # nothing was scored


def test_a_missing_data_file_is_refused(tmp_path, capsys):
    model = save_tiny_checkpoint(tmp_path / "m", hidden_size=32, num_layers=1, seed=0)
    cfg = _config(tmp_path / "cfg.yaml", "arithmetic")
    assert main(["eval", str(model), "--config", str(cfg), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_heldout_cross_entropy_is_the_mean_nll_of_the_reference_response_tokens(tmp_path):
    """Against a direct forward of the model: -mean log p(response token | everything before it), with
    the prompt and response cut as in training (the quantity training reports as eval_loss)."""
    import torch

    from kdray.data.tokenize import tokenize_example
    from kdray.eval.evaluate import heldout_cross_entropy
    from kdray.models.loading import load_causal_lm

    path = save_tiny_checkpoint(tmp_path / "m", hidden_size=32, num_layers=1, seed=4)
    records = [
        {"prompt": "Tom has 3 apples and buys 4 more.", "response": "He has 3 + 4 = 7 apples.\n#### 7"},
        {"prompt": "Mia has 12 pens.", "response": "#### 12"},
        {"prompt": "Sam has 9 eggs and eats 2 of them today.", "response": "9 - 2 = 7\n#### 7"},
    ]
    shape = {"max_prompt_tokens": 24, "max_response_tokens": 12}  # both cut: truncation is part of it
    model, tokenizer = load_causal_lm(str(path), device="cpu")
    total, count = 0.0, 0
    for r in records:
        example = tokenize_example(tokenizer, r["prompt"], r["response"], chat_template=False, **shape)
        ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        response = torch.tensor(example["response_mask"][1:], dtype=torch.bool)
        total -= float(logprobs[torch.arange(len(targets)), targets][response].sum())
        count += int(response.sum())
    got = heldout_cross_entropy(path, records, chat_template=False, batch_size=2, **shape)
    assert got == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("chat_template", [True, False])
def test_an_exported_student_renders_prompts_as_its_training_did(tmp_path, capsys, chat_template):
    """A student trained on raw prompts is exported without its tokenizer's chat template, so whoever
    loads it (kdray eval with any config, vLLM, a pipeline) cannot wrap its prompts in a template it
    never saw; one trained through the template keeps it."""
    from transformers import AutoTokenizer

    from kdray.config import load_config
    from kdray.models.build import export_student
    from kdray.models.prompts import encode_prompt
    from kdray.models.tiny import tiny_causal_lm
    from kdray.models.tokenizer import char_tokenizer
    from kdray.train.trainer import loop_spec

    cfg = load_config(None, [f"data.chat_template={str(chat_template).lower()}"])
    spec = loop_spec(cfg, teacher_path=None, metrics_path=tmp_path / "m.jsonl", export_path=tmp_path / "s")
    assert spec.chat_template is chat_template  # what the training loop hands `export_student`
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(len(tokenizer), hidden_size=32, num_heads=2, seed=1)
    export_student(model, tokenizer, spec.export_path, chat_template=spec.chat_template)
    assert tokenizer.chat_template  # the training tokenizer keeps its template
    loaded = AutoTokenizer.from_pretrained(spec.export_path)
    prompt = "Tom has 3 apples."
    trained_on = encode_prompt(tokenizer, prompt, chat_template=chat_template)
    assert encode_prompt(loaded, prompt) == trained_on  # the default rendering of whoever loads it

    # scored with a config that renders raw prompts, a student trained through its template is flagged
    data = _jsonl(tmp_path / "q.jsonl", [{"question": prompt, "answer": "#### 3"}])
    cfg = _config(tmp_path / "cfg.yaml", "arithmetic")
    raw = ["data.chat_template=false"]
    assert main(["eval", str(spec.export_path), "--config", str(cfg), "--data", str(data), *raw]) == 0
    flagged = "add data.chat_template=true" in capsys.readouterr().err
    assert flagged is chat_template
