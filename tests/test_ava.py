"""AVA (AVRIL with no teacher): the preference term, pairs through the training step, preference data
(files, the hub's layouts, generated slips), the config and the method declarations. Real Ray runs and
the reward model are in test_ava_runs.py."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from kdray.config import ConfigError, config_from_dict
from kdray.data import MalformedRow, generate_arithmetic, read_config_split
from kdray.data.arithmetic import split_of
from kdray.data.preferences import (
    arithmetic_pair_splits,
    arithmetic_pairs,
    pair_rows,
    read_preferences,
    slip_answer,
)
from kdray.data.tokenize import collate, tokenize_example
from kdray.losses import build_objective
from kdray.losses.ava import PairLayoutError, ava_pref_loss, check_pair_layout
from kdray.methods import METHODS, get_method
from kdray.models import Student
from kdray.models.tiny import tiny_causal_lm
from kdray.models.tokenizer import char_tokenizer
from kdray.train.step import (
    StepConfig,
    global_token_count,
    loss_mask,
    student_forward,
    to_tensors,
    train_step,
)

TOK = char_tokenizer()


def encode(rows, *, signs=True):
    examples = [
        tokenize_example(TOK, r["prompt"], r["response"], max_prompt_tokens=160, max_response_tokens=96)
        for r in rows
    ]
    batch = collate(examples, TOK.pad_token_id)
    if signs:
        batch["pair_sign"] = [r["pair_sign"] for r in rows]
    return to_tensors(batch)


def student(seed=0):
    torch.manual_seed(seed)
    return Student.with_reward_head(
        tiny_causal_lm(len(TOK), hidden_size=32, num_layers=1, num_heads=1, seed=seed)
    )


# --- the preference term -----------------------------------------------------------------------------


def test_bradley_terry_matches_a_brute_force_loop_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(8, 7, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(8, 7, generator=g) > 0.3
    sign = torch.tensor([1, -1, 0, 0, 1, -1, 1, -1])
    loss, subs = ava_pref_loss(mu, mask, sign, lambda_bt=0.5, num_pairs=5)  # 3 here, 5 in the step
    (grad,) = torch.autograd.grad(loss, mu)

    mu2 = mu.detach().clone().requires_grad_(True)
    total, wins, margin = 0.0, 0, 0.0
    for i in (0, 4, 6):
        chosen = sum(mu2[i, t] for t in range(7) if mask[i, t])
        rejected = sum(mu2[i + 1, t] for t in range(7) if mask[i + 1, t])
        total = total - torch.log(1.0 / (1.0 + torch.exp(-(chosen - rejected))))
        wins += int(chosen > rejected)
        margin += float((chosen - rejected).detach())
    brute = 0.5 * total / 5
    (grad2,) = torch.autograd.grad(brute, mu2)
    assert torch.allclose(loss, brute) and torch.allclose(grad, grad2)
    assert torch.allclose(subs["bt"], total.detach() / 5)
    assert subs["accuracy"].item() == pytest.approx(wins / 5) and subs["margin"].item() == pytest.approx(
        margin / 5
    )
    assert grad[2:4].abs().sum() == 0, "unpaired rows get no preference gradient"


def test_a_split_pair_is_refused_naming_the_rows():
    check_pair_layout(torch.tensor([1, -1, 0, 0]))
    with pytest.raises(PairLayoutError, match=r"rows 2 and 3 have pair_sign -1, 1"):
        check_pair_layout(torch.tensor([1, -1, -1, 1]))
    with pytest.raises(PairLayoutError, match=r"even train\.batch_size"):
        check_pair_layout(torch.tensor([1, -1, 0]))


# --- pairs through the training step -----------------------------------------------------------------

PAIRS = arithmetic_pairs(6, seed=3, difficulty=2, split="train")


def test_rejected_rows_are_no_demonstrations_but_the_preference_term_reads_them():
    rows = pair_rows(PAIRS[:2])
    batch = encode(rows)
    chosen_only = encode([r for r in rows if r["pair_sign"] == 1], signs=False)
    mask = loss_mask(batch)
    assert mask[1::2].sum() == 0 and mask[0::2].sum() > 0
    assert global_token_count([batch]) == global_token_count([chosen_only])
    model = student()
    objective = build_objective(get_method("ava_d").terms)
    with torch.no_grad():
        logits, lb = student_forward(model, batch, len(TOK))
        logits_c, lb_c = student_forward(model, chosen_only, len(TOK))
        n = global_token_count([batch])
        _, logs = objective(logits, lb, num_tokens=n)
        _, logs_c = objective(logits_c, lb_c, num_tokens=n)
    for key in ("xkd/imitation", "xkd/td_nll", "xkd/prior_kl"):
        assert logs[key].item() == pytest.approx(logs_c[key].item(), rel=1e-5), key
    assert lb["pair_mask"][1::2].sum() > 0, "the preference term sees the rejected responses"


def test_pairs_in_two_micro_batches_train_exactly_like_one_batch():
    """The preference term is averaged over the step's pairs, as the token terms over its tokens."""
    rows = pair_rows(PAIRS[:4])
    objective = build_objective(get_method("ava_p").terms)
    params = []
    for micro in ([encode(rows)], [encode(rows[:4]), encode(rows[4:])]):
        model = student(seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        logs = train_step(model, opt, objective, micro, StepConfig(grad_clip=None, vocab_size=len(TOK)))
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert math.isfinite(logs["ava_pref/bt"]) and logs["ava_pref/bt"] > 0
    assert torch.allclose(params[0], params[1], atol=1e-6)


# --- preference data ---------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


CONVERSATION = {
    "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
}


def test_reads_plain_and_conversational_pairs(tmp_path):
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven.", "id": "c1"},
        CONVERSATION,
        {**CONVERSATION, "prompt": [{"role": "user", "content": "2+2?"}]},
    ]
    result = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows), task="gsm8k")
    assert result.malformed == []
    first, conv, conv_prompt = result.records
    assert first == {"prompt": "Name a colour.", "response": "Blue.", "chosen": "Blue.", "rejected": "Seven.",
                     "answer": None, "id": "c1"}  # fmt: skip
    assert (conv["prompt"], conv["chosen"], conv["rejected"], conv["id"]) == ("2+2?", "4", "5", "p.jsonl:2")
    assert conv_prompt["prompt"] == "2+2?"


def test_malformed_pairs_name_the_file_row_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "a"},
            {"prompt": "p", "chosen": 3, "rejected": "b"},
            {"chosen": [{"role": "user", "content": "q"}], "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            "{not json\n",
            {"chosen": "a", "rejected": "b"},
            {
                **CONVERSATION,
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "5"}],
            },
        ],
    )
    result = read_preferences(path)
    assert len(result.records) == 1
    assert [(m.line_no, m.field) for m in result.malformed] == [
        (2, "rejected"), (3, "chosen"), (4, "chosen"), (5, "rejected"), (6, None), (7, "prompt"), (8, "rejected"),
    ]  # fmt: skip
    with pytest.raises(MalformedRow, match=rf"{re.escape(str(path))}:2: malformed row \(field 'rejected'\)"):
        read_preferences(path, on_malformed="fail")


def test_pairs_from_parquet_a_saved_hf_dataset_and_the_hf_json_builder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]

    def triples(result):
        return [(r["prompt"], r["chosen"], r["rejected"]) for r in result.records]

    parquet = tmp_path / "data"
    parquet.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(parquet / "test.parquet"))
    assert triples(read_preferences(parquet, split="test")) == expected  # a {split}.parquet directory
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    assert triples(read_preferences(saved, format="hf", split="test")) == expected
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    assert triples(read_preferences(jsonl, format="hf", limit=3)) == expected[:3]


_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _steps(answer):
    *lines, final = answer.split("\n")
    return [tuple(int(x) if x.isdigit() else x for x in _STEP.search(line).groups()) for line in lines], final


def _right(a, op, b, c):
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_generated_pairs_have_one_slip_carried_consistently(difficulty):
    pairs = arithmetic_pairs(60, seed=0, difficulty=difficulty, split="train")
    demonstrations = generate_arithmetic(60, seed=0, difficulty=difficulty, split="train")
    assert [p["chosen"] for p in pairs[:50]] == [d["response"] for d in demonstrations[:50]]
    for p in pairs:
        assert p["response"] == p["chosen"] and p["answer"] == p["chosen"].rsplit("#### ", 1)[1]
        chosen, _ = _steps(p["chosen"])
        rejected, final = _steps(p["rejected"])
        assert all(_right(*s) for s in chosen) and len(rejected) == len(chosen)
        wrong = [i for i, s in enumerate(rejected) if not _right(*s)]
        assert len(wrong) == 1, p["rejected"]
        j = wrong[0]
        assert rejected[:j] == chosen[:j] and rejected[j][:3] == chosen[j][:3]
        assert 1 <= abs(rejected[j][3] - chosen[j][3]) <= 3
        for k in range(1, len(rejected)):  # every later line starts from the slipped value
            assert rejected[k][0] == rejected[k - 1][3]
        assert final == f"#### {rejected[-1][3]}" and final != p["chosen"].rsplit("\n", 1)[1]
    assert arithmetic_pairs(60, seed=0, difficulty=difficulty, split="train") == pairs
    assert arithmetic_pairs(80, seed=0, difficulty=difficulty, split="train")[:60] == pairs


def test_generated_train_and_test_pairs_share_no_question():
    train, test = arithmetic_pair_splits(300, 100, seed=1, difficulty=2)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert {split_of(p["prompt"]) for p in train} == {"train"} and {split_of(p["prompt"]) for p in test} == {
        "test"
    }
    with pytest.raises(ValueError, match="not a worked answer"):
        slip_answer("no arithmetic here\n#### 3", __import__("random").Random(0))


def test_pair_rows_keep_pairs_at_even_rows():
    demo = {"prompt": "p", "response": "r", "answer": None, "id": "d"}
    rows = pair_rows([demo, PAIRS[0], {**demo, "id": "e"}, PAIRS[1], {**demo, "id": "f"}])
    assert [r["pair_sign"] for r in rows] == [1, -1, 0, 0, 1, -1, 0]
    assert [r["id"] for r in rows[2:4]] == ["d", "e"] and rows[1]["response"] == PAIRS[0]["rejected"]
    check_pair_layout(torch.tensor([r["pair_sign"] for r in rows[:6]]))


def test_pairs_tokenized_in_process_reach_the_step_whole():
    """A Tune trial reads its rows in process (object columns): pairs arrive as the pipeline lays them."""
    from kdray.data.local import tokenized_records
    from kdray.train.batches import micro_batches

    rows = pair_rows(PAIRS)
    ds = tokenized_records(
        rows, TOK, max_prompt_tokens=160, max_response_tokens=96, chat_template=True, batch_size=4
    )
    batches = [to_tensors(b) for b in micro_batches(ds, 4, TOK.pad_token_id, max_epochs=1)]
    assert len(batches) == 3
    for b in batches:
        assert b["pair_sign"].dtype == torch.long and b["pair_sign"].tolist() == [1, -1, 1, -1]
        check_pair_layout(b["pair_sign"])


# --- config ------------------------------------------------------------------------------------------


def cfg_dict(**data):
    return {
        "data": {"preferences": True, **data},
        "objective": {"method": "ava_p"},
        "train": {"batch_size": 4},
    }


def test_config_selects_preference_data_and_refuses_what_would_break_pairs():
    cfg = config_from_dict({**cfg_dict(num_examples=5, eval_examples=3, difficulty=1)})
    train, held_out = read_config_split(cfg.data, "train"), read_config_split(cfg.data, "eval")
    assert len(train.records) == 5 and all(r["rejected"] for r in train.records)
    assert held_out.records == arithmetic_pairs(3, seed=0, difficulty=1, split="test")
    with pytest.raises(ConfigError, match=r"data.preferences = False .* true for method 'ava_p'"):
        config_from_dict({"objective": {"method": "ava_p"}})
    with pytest.raises(ConfigError, match=r"train.batch_size = 5 .* an even number"):
        config_from_dict({**cfg_dict(), "train": {"batch_size": 5}})
    with pytest.raises(ConfigError, match="on_policy_fraction"):
        config_from_dict({**cfg_dict(), "objective": {"method": "gkd"}})
    with pytest.raises(ConfigError, match="teacher_generations"):
        config_from_dict({**cfg_dict(), "objective": {"method": "ava_d", "teacher_generations": True}})


def test_a_run_lays_out_pairs_and_the_demonstrations_beside_them():
    from kdray.train.trainer import training_rows

    cfg = config_from_dict(cfg_dict())  # batch 4, one worker
    demo = {"prompt": "p", "response": "r", "answer": None, "id": "d"}
    train, held_out = training_rows(cfg, [*PAIRS[:3], demo, {**demo, "id": "e"}, demo], PAIRS[3:6])
    assert [r["pair_sign"] for r in train] == [1, -1, 1, -1, 1, -1, 0, 0]  # cut to whole batches of 4
    assert [r["pair_sign"] for r in held_out] == [1, -1, 1, -1]
    with pytest.raises(ValueError, match="no train record has a 'rejected' response"):
        training_rows(cfg, [demo] * 4, PAIRS[:2])


# --- methods -----------------------------------------------------------------------------------------


def test_ava_methods_are_declared_and_need_no_teacher(capsys):
    from kdray.cli import main
    from kdray.losses import TERMS
    from kdray.train.trainer import needs_generations, needs_pool, needs_signal

    assert main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["ava_d"]["needs"] == [] and listed["ava_p"]["needs"] == []
    assert listed["ava_p"]["pairs"] and not listed["ava_d"]["pairs"]
    assert [t["name"] for t in listed["ava_p"]["terms"]] == ["xkd", "ava_pref"]
    assert listed["ava_p"]["terms"][0]["params"]["variant"] == "sequence"
    assert listed["ava_p"]["terms"][1]["params"] == {"lambda_bt": 1.0}
    assert not TERMS["ava_pref"].reads_signal({}) and TERMS["ava_pref"].reward_head
    for name, data in (("ava_d", {}), ("ava_p", {"preferences": True})):
        cfg = config_from_dict({"data": data, "objective": {"method": name}})
        assert not (needs_signal(cfg) or needs_generations(cfg) or needs_pool(cfg)), name
        assert build_objective(cfg.objective.terms).reward_head is not None
    assert {"ava_d", "ava_p"} <= set(METHODS)
