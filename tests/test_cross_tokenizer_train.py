"""Cross-tokenizer distillation through the real training path: config, preflight, teacher signal over
the teacher's own tokenization, the `uld`/`gold` terms, and a BPE teacher distilled into a character
student on Ray.

The two tokenizers are real and genuinely different: a byte-level BPE trained here on the task's text
(the teacher's, with a ChatML template) and kdray's character tokenizer (the student's, its own template).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.config import ConfigError, config_from_dict, load_config, with_overrides
from kdray.data import generate_arithmetic
from kdray.data.tokenize import Tokenize, unpadded
from kdray.losses import build_objective
from kdray.losses.alignment import response_groups
from kdray.losses.cross_tokenizer import gold_loss, uld_batch, vocab_map
from kdray.methods.cross_tokenizer import CROSS_TOKENIZER_PARAMS
from kdray.models.bpe import bpe_tokenizer, save_bpe_checkpoint
from kdray.models.prompts import encode_prompt, encode_response
from kdray.models.student import Student
from kdray.models.tiny import save_tiny_checkpoint, tiny_causal_lm
from kdray.models.tokenizer import char_tokenizer
from kdray.teacher import Teacher, VocabularyMismatchError, check_vocabularies
from kdray.teacher.cross_signal import CrossTokenizerSignal
from kdray.train.batches import regularize_batch
from kdray.train.step import student_forward, teacher_signal, to_tensors

ROOT = Path(__file__).resolve().parents[1]
MAX_PROMPT, MAX_RESPONSE = 160, 64


@pytest.fixture(scope="module")
def records():
    return (
        generate_arithmetic(600, seed=0, difficulty=1),
        generate_arithmetic(48, seed=1, difficulty=1, split="test"),
    )


@pytest.fixture(scope="module")
def bpe(records):
    return bpe_tokenizer([f"{r['prompt']}\n{r['response']}" for r in records[0]], 512)


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer()


def cross_cfg(loss: str | None = "uld", **objective):
    return config_from_dict(
        {"objective": {"method": "supervised_kd", "cross_tokenizer": loss, **objective}}, "<test>"
    )


# ---- config ----------------------------------------------------------------------------------------


def test_config_resolves_the_reference_defaults_and_one_term():
    cfg = cross_cfg("uld")
    assert cfg.objective.cross_tokenizer_params == CROSS_TOKENIZER_PARAMS["uld"]
    assert cfg.objective.cross_tokenizer_params["ce_weight"] == 1.0
    assert cfg.objective.cross_tokenizer_params["distil_weight"] == 1.5
    (term,) = cfg.objective.terms
    assert term.name == "uld" and dict(term.params) == CROSS_TOKENIZER_PARAMS["uld"]
    gold = cross_cfg("gold", cross_tokenizer_params={"beta": 0.25})
    assert (
        gold.objective.terms[0].params["beta"] == 0.25 and gold.objective.terms[0].params["ce_weight"] == 0.0
    )
    assert cross_cfg(None).objective.terms[0].name == "forward_kl"  # off: the method's own divergence


def test_switching_the_loss_resolves_the_other_losss_defaults():
    gold = with_overrides(cross_cfg("uld"), {"objective.cross_tokenizer": "gold"})
    assert gold.objective.terms[0].name == "gold"
    assert gold.objective.cross_tokenizer_params == CROSS_TOKENIZER_PARAMS["gold"]
    tuned = with_overrides(gold, {"objective.cross_tokenizer_params.beta": 0.9})
    assert tuned.objective.terms[0].params["beta"] == 0.9
    off = with_overrides(gold, {"objective.cross_tokenizer": None})
    assert off.objective.terms[0].name == "forward_kl" and not off.objective.cross_tokenizer_params


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["objective.cross_tokenizer=uld", "objective.cross_tokenizer_params.beta=0.2"],
            "'uld' has no parameter 'beta'",
        ),
        (
            ["objective.cross_tokenizer=gold", "objective.cross_tokenizer_params.align=bytes"],
            "align = 'bytes'",
        ),
        (
            ["objective.cross_tokenizer=gold", "objective.cross_tokenizer_params.beta=2"],
            r"beta = 2.* \[0, 1\]",
        ),
        (["objective.cross_tokenizer_params.ce_weight=1"], "empty unless objective.cross_tokenizer is set"),
        (["objective.terms=[{name: gold}]"], "unless objective.cross_tokenizer: gold is set"),
        (
            ["objective.cross_tokenizer=gold", "objective.terms=[{name: ce}]"],
            "set its knobs in objective.cross",
        ),
    ],
)
def test_config_refuses_bad_knobs_naming_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["objective.method=supervised_kd", *overrides])


@pytest.mark.parametrize(
    ("method", "match"),
    [
        ("sft", "text_only"),
        ("gkd", "on_policy_fraction 0.5"),
        ("distillm", "adaptive"),
        ("xkd", "trains its own loss"),
    ],
)
def test_methods_the_loss_cannot_adapt_are_refused(method, match):
    from kdray.validate import validate_config

    with pytest.raises(ConfigError, match=match):
        validate_config(load_config(None, [f"objective.method={method}", "objective.cross_tokenizer=uld"]))
    validate_config(load_config(None, ["objective.method=gkd", "objective.on_policy_fraction=0",
                                       "objective.cross_tokenizer=gold"]))  # fmt: skip


def test_gold_without_cross_entropy_is_warned_about_before_the_run(caplog):
    from kdray.validate import validate_config

    base = ["objective.method=supervised_kd", "objective.cross_tokenizer=gold"]
    with caplog.at_level("WARNING", logger="kdray.validate"):
        validate_config(load_config(None, base))
    assert "ce_weight: 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kdray.validate"):
        validate_config(load_config(None, [*base, "objective.cross_tokenizer_params.ce_weight=1"]))
        validate_config(
            load_config(None, ["objective.method=supervised_kd", "objective.cross_tokenizer=uld"])
        )
    assert "ce_weight" not in caplog.text


def test_docs_list_every_knob_with_its_default():
    doc = (ROOT / "docs" / "cross_tokenizer.md").read_text()
    for loss, knobs in CROSS_TOKENIZER_PARAMS.items():
        for knob, default in knobs.items():
            shown = "null" if default is None else f"{default:g}" if isinstance(default, float) else default
            assert f"| `{knob}` | {shown} |" in doc.split(f"### `{loss}`")[1].split("###")[0], (loss, knob)


# ---- preflight -------------------------------------------------------------------------------------


def test_preflight_accepts_different_tokenizers_only_with_a_declared_way(bpe, chars):
    heads = {"teacher_head": len(bpe), "student_head": len(chars)}
    with pytest.raises(VocabularyMismatchError) as err:
        check_vocabularies(bpe, chars, method="supervised_kd", **heads)
    message = str(err.value)
    assert f"{len(bpe)} tokens" in message and f"{len(chars)} tokens" in message
    assert "objective.cross_tokenizer: uld or gold" in message and "text-only method" in message
    assert not check_vocabularies(
        bpe, chars, method="supervised_kd", cross_tokenizer="gold", **heads
    ).same_tokenizer
    check_vocabularies(bpe, chars, method="seqkd", **heads)  # text only: any pair


@pytest.fixture(scope="module")
def bpe_student_dir(tmp_path_factory, bpe):
    """A student checkpoint whose tokenizer (BPE) differs from the workflow's tiny teacher's (characters)."""
    return save_bpe_checkpoint(
        tmp_path_factory.mktemp("bpe-student") / "s", bpe, hidden_size=32, num_layers=1
    )


def test_workflow_refuses_a_mismatch_at_start_before_any_teacher(tmp_path, bpe_student_dir):
    from kdray.workflow import cache_root, run_workflow

    cfg = load_config(None, [
        f"model.name_or_path={bpe_student_dir}", "objective.method=supervised_kd",
        f"workflow.workdir={tmp_path}", "tracking.enabled=false",
    ])  # fmt: skip
    started = time.perf_counter()
    with pytest.raises(VocabularyMismatchError, match=r"tiny \(trained from scratch.*vs student"):
        run_workflow(cfg)
    assert time.perf_counter() - started < 30  # tokenizer files only (seconds, even on a busy machine)
    assert not list(cache_root(cfg).glob("teacher-*")) and not list(cache_root(cfg).glob("data-*"))


def test_workflow_distils_across_tokenizers_scoring_the_teacher_live(tmp_path, bpe_student_dir, ray_session):
    """A BPE student from a character teacher through `kdray run`'s steps: no cached pass (it would hold
    the student's tokens only); the distill step scores the teacher's own tokenization as it trains."""
    from kdray.workflow import run_workflow
    from kdray.workflow.teacher_outputs import LIVE_CROSS_TOKENIZER

    teacher = save_tiny_checkpoint(tmp_path / "teacher", hidden_size=32, num_layers=1, seed=1)
    cfg = load_config(None, [
        f"model.name_or_path={bpe_student_dir}", f"teacher.name_or_path={teacher}", "teacher.top_k=null",
        "objective.method=supervised_kd", "objective.cross_tokenizer=uld", "data.num_examples=48",
        "data.eval_examples=4", "train.batch_size=4", "train.max_steps=3", "train.checkpoint_every=3",
        "train.eval_every=3", "tracking.enabled=false", f"workflow.workdir={tmp_path / 'run'}",
        "workflow.steps=[data,teacher,teacher_outputs,distill]", "workflow.baseline=false",
    ])  # fmt: skip
    steps = {s.step: s for s in run_workflow(cfg).steps}
    assert steps["teacher_outputs"].outputs == {"signal_cache": None, "reason": LIVE_CROSS_TOKENIZER}
    final = steps["distill"].outputs["final"]
    assert final["step"] == 3 and math.isfinite(final["loss"]) and final["loss"] > 0


def test_distill_refuses_a_mismatch_before_any_actor(tmp_path, records, bpe_student_dir):
    from kdray.train.trainer import distill

    teacher = save_tiny_checkpoint(tmp_path / "t", hidden_size=32, num_layers=1)
    cfg = load_config(None, [f"model.name_or_path={bpe_student_dir}", "objective.method=supervised_kd"])
    started = time.perf_counter()
    with pytest.raises(VocabularyMismatchError):
        distill(cfg, *records, workdir=tmp_path / "w", teacher_path=str(teacher))
    assert time.perf_counter() - started < 30 and not (tmp_path / "w").exists()


# ---- the signal and the terms, in process -----------------------------------------------------------


@pytest.fixture(scope="module")
def pair(bpe, chars):
    """A tiny BPE teacher serving its full distribution and a tiny character student."""
    teacher = Teacher(model=tiny_causal_lm(len(bpe), hidden_size=32, num_layers=1, seed=1), tokenizer=bpe,
                      top_k=None)  # fmt: skip
    student = Student(tiny_causal_lm(len(chars), hidden_size=32, num_layers=1, seed=2))
    return teacher, student


def signal_batch(teacher, chars, rows, max_response=MAX_RESPONSE):
    """The cross-tokenizer signal of `rows` as the scoring actor computes it (padded to the batch)."""
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("prompt", "response")}
    tokenized = Tokenize(chars, max_prompt_tokens=MAX_PROMPT, max_response_tokens=max_response)(batch)
    signal = CrossTokenizerSignal(
        teacher, chars, max_prompt_tokens=MAX_PROMPT, max_response_tokens=max_response
    )
    return signal(tokenized)


def scored_batch(teacher, chars, rows, max_response=MAX_RESPONSE):
    """What the worker trains on: the signal cut to each row as it leaves the actor, padded once."""
    return regularize_batch(unpadded(signal_batch(teacher, chars, rows, max_response)), chars.pad_token_id)


def test_cutting_the_signal_to_its_rows_loses_nothing(pair, chars, records):
    """Student columns cut to the student's tokens, teacher columns to the teacher's: padded again by the
    worker, every column equals the actor's padded batch."""
    teacher, _ = pair
    rows = records[0][:5]
    padded = signal_batch(teacher, chars, rows)
    cut = unpadded(padded)
    assert [len(r) for r in cut["xtok_topk_ids"]] == [int(m.sum()) for m in padded["xtok_teacher_mask"]]
    assert len({len(r) for r in cut["input_ids"]}) > 1, "rows of different lengths, or nothing was cut"
    direct = regularize_batch(padded, chars.pad_token_id)
    again = regularize_batch(cut, chars.pad_token_id)
    assert sorted(again) == sorted(direct)
    for key, value in direct.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            np.testing.assert_array_equal(again[key], value, err_msg=key)


def reference_rows(teacher, student, chars, record, temperature=1.0):
    """Rows computed from scratch: each model on its own rendering, target-aligned response rows."""
    bpe = teacher.tokenizer
    t_head, t_tail = encode_prompt(bpe, record["prompt"]), encode_response(bpe, record["response"])
    s_head, s_tail = encode_prompt(chars, record["prompt"]), encode_response(chars, record["response"])
    with torch.no_grad():
        t_logits = teacher.backend.model(torch.tensor([t_head + t_tail])).logits[0]
    s_logits = student.lm(torch.tensor([s_head + s_tail])).logits[0]
    t_rows = torch.log_softmax(t_logits[len(t_head) - 1 : -1] / temperature, -1)
    s_rows = torch.log_softmax(s_logits[len(s_head) - 1 : -1] / temperature, -1)
    return s_rows, t_rows, torch.tensor(s_tail), torch.tensor(t_tail)


def term_value(name, student, chars, batch, runtime, **params):
    tensors = to_tensors(batch)
    logits, loss_batch = student_forward(student, tensors, len(chars))
    objective = build_objective([{"name": name, "params": params}])
    _, logs = objective(logits, loss_batch, teacher_signal(tensors, len(chars)), runtime={name: runtime})
    return logs


@pytest.mark.parametrize("strategy", ["observed", "bayesian"])
def test_uld_term_equals_the_pure_loss_on_each_models_own_tokenization(pair, chars, records, strategy):
    teacher, student = pair
    record = records[0][3]
    batch = scored_batch(teacher, chars, [record])
    # the student's row is its own tokenization; the teacher's columns are its own, response rows only
    assert batch["input_ids"][0][: int(batch["attention_mask"][0].sum())].tolist() == (
        encode_prompt(chars, record["prompt"]) + encode_response(chars, record["response"])
    )
    assert int(batch["xtok_teacher_mask"][0].sum()) == len(
        encode_response(teacher.tokenizer, record["response"])
    )
    s_rows, t_rows, s_ids, t_ids = reference_rows(teacher, student, chars, record)
    groups = response_groups(chars, teacher.tokenizer, record["response"])
    expected = uld_batch([s_rows], [t_rows], groups=[groups], student_token_ids=[s_ids],
                         teacher_token_ids=[t_ids], strategy=strategy)  # fmt: skip
    runtime = {"teacher_vocab_size": len(teacher.tokenizer)}
    logs = term_value("uld", student, chars, batch, runtime, strategy=strategy)
    assert logs["uld/distil"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert logs["uld/rows"].item() == len(groups)
    ce = torch.nn.functional.cross_entropy(torch.log_softmax(s_rows * 1.0, -1), s_ids)
    assert logs["uld/ce"].item() == pytest.approx(ce.item(), rel=1e-4)
    assert logs["uld"].item() == pytest.approx(ce.item() + 1.5 * expected.item(), rel=1e-4)


def test_gold_term_equals_the_pure_hybrid_and_needs_the_vocab_map(pair, chars, records):
    teacher, student = pair
    record = records[0][5]
    batch = scored_batch(teacher, chars, [record])
    s_rows, t_rows, s_ids, t_ids = reference_rows(teacher, student, chars, record)
    from kdray.losses.cross_tokenizer import align_distributions

    groups = response_groups(chars, teacher.tokenizer, record["response"])
    s, t = align_distributions(
        s_rows, t_rows, groups=groups, student_token_ids=s_ids, teacher_token_ids=t_ids
    )
    mapping = vocab_map(chars, teacher.tokenizer)
    expected, parts = gold_loss(s, t, *mapping, beta=0.5)
    runtime = {"vocab_map": mapping, "teacher_vocab_size": len(teacher.tokenizer)}
    logs = term_value("gold", student, chars, batch, runtime)
    assert logs["gold/distil"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert logs["gold/matched"].item() == pytest.approx(parts["matched"].item(), rel=1e-4)
    assert logs["gold"].item() == pytest.approx(expected.item(), rel=1e-4)  # reference ce_weight = 0
    with pytest.raises(ValueError, match="vocabulary map"):
        term_value("gold", student, chars, batch, {})


def test_examples_weigh_by_their_tokens_and_truncation_drops_cut_groups(pair, chars, records):
    teacher, student = pair
    rows = records[0][:3]
    batch = scored_batch(teacher, chars, rows, max_response=12)
    runtime = {"teacher_vocab_size": len(teacher.tokenizer)}
    for i in range(len(rows)):
        s_tokens = np.flatnonzero(batch["xtok_student_group"][i] >= 0)
        assert len(s_tokens) and s_tokens.max() < int(batch["attention_mask"][i].sum())
        for g in np.unique(batch["xtok_student_group"][i][s_tokens]):  # each kept group spells one text
            s_text = chars.decode(batch["input_ids"][i][batch["xtok_student_group"][i] == g])
            t_ids = np.flatnonzero(batch["xtok_teacher_group"][i] == g)
            assert len(t_ids) and s_text == teacher.tokenizer.decode(
                encode_response(teacher.tokenizer, rows[i]["response"])[t_ids.min() : t_ids.max() + 1]
            )
    whole = term_value("uld", student, chars, batch, runtime)["uld/distil"].item()
    singles = [term_value("uld", student, chars, {k: v[i : i + 1] for k, v in batch.items()}, runtime)
               ["uld/distil"].item() for i in range(len(rows))]  # fmt: skip
    assert whole == pytest.approx(np.mean(singles), rel=1e-4)  # 12 counted tokens each: equal weights


def test_rows_tokenised_by_another_tokenizer_are_refused(pair, chars, bpe, records):
    teacher, _ = pair
    batch = {k: np.array([records[0][0][k]], dtype=object) for k in ("prompt", "response")}
    wrong = Tokenize(bpe, max_prompt_tokens=MAX_PROMPT, max_response_tokens=MAX_RESPONSE)(batch)
    with pytest.raises(ValueError, match="tokenised with another tokenizer"):
        CrossTokenizerSignal(teacher, chars, max_prompt_tokens=MAX_PROMPT, max_response_tokens=MAX_RESPONSE)(
            wrong
        )


# ---- a real run: a BPE teacher trained with CE, a character student distilled on Ray ---------------

TEACHER_STEPS, STUDENT_STEPS = 300, 60


def heldout_loglik(path: str, held_out) -> float:
    """Mean log-likelihood per token of the held-out reference responses, under the model's tokenizer."""
    model = Teacher(path, top_k=1, batch_size=16)
    return float(np.mean(model.reward([r["prompt"] for r in held_out], [r["response"] for r in held_out])))


def run_cfg(model: str, teacher: str, objective: dict, steps: int):
    return config_from_dict({
        "model": {"name_or_path": model},
        "teacher": {"name_or_path": teacher, "top_k": 16, "num_cpus": 1, "batch_size": 16},
        "data": {"max_prompt_tokens": MAX_PROMPT, "max_response_tokens": MAX_RESPONSE},
        "objective": objective,
        "train": {"batch_size": 16, "max_steps": steps, "lr": 3e-3, "warmup_steps": 10, "seed": 0,
                  "checkpoint_every": steps, "eval_every": steps},
        "tracking": {"log_every": max(steps // 4, 1)},
    })  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, records, bpe, ray_session):
    """The teacher trained with CE (its own BPE tokenizer), and the student's initialisation."""
    from kdray.train.trainer import distill

    root = tmp_path_factory.mktemp("cross-run")
    init = save_bpe_checkpoint(root / "teacher-init", bpe, hidden_size=64, num_layers=2, num_heads=2, seed=1)
    cfg = run_cfg(str(init), "tiny", {"method": "sft"}, TEACHER_STEPS)
    teacher = distill(cfg, *records, workdir=root, name="teacher")
    student = save_tiny_checkpoint(root / "student-init", hidden_size=64, num_layers=1, num_heads=2, seed=2)
    return root, str(teacher.export_path), str(student)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "params"),
    # GOLD's reference has no cross-entropy; with a character student its un-normalised merged rows then
    # reward lowering the observed continuation (docs/cross_tokenizer.md), so it trains with ULD's CE
    [("uld", {}), ("gold", {"ce_weight": 1.0})],
)
def test_a_character_student_learns_from_a_bpe_teacher(trained, records, loss, params):
    from kdray.train.trainer import distill

    root, teacher, student = trained
    held_out = records[1]
    assert heldout_loglik(teacher, held_out) > -1.5  # the teacher learned the task in its own tokens
    objective = {"method": "supervised_kd", "cross_tokenizer": loss, "cross_tokenizer_params": params}
    run = distill(run_cfg(student, teacher, objective, STUDENT_STEPS), *records, workdir=root,
                  name=f"student-{loss}", teacher_path=teacher)  # fmt: skip
    first, final = run.history[0], run.final
    assert final[f"{loss}/rows"] > 10  # aligned groups per response were compared
    assert final[f"{loss}/distil"] < first[f"{loss}/distil"]  # the student moved toward the teacher
    if loss == "gold":
        assert {"gold/matched", "gold/unmatched"} <= set(final)
    before, after = heldout_loglik(student, held_out), heldout_loglik(str(run.export_path), held_out)
    assert after > before + 1.0, f"{loss}: held-out log-likelihood per token {before:.3f} -> {after:.3f}"
