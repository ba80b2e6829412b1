"""PAD as a method: the `pad` term against brute force, groups through the step and through real Ray
Data, the offline data preparation (initial student's samples, teacher's log-prob and MCQ judge) on
tiny models, the config and the declaration. The pure math of `kdray.losses.pad` is in test_pad.py."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from kdray.config import ConfigError, config_from_dict
from kdray.data.tokenize import collate, tokenize_example
from kdray.losses import build_objective
from kdray.losses.pad import letter_probability, mcq_prompt, pad_loss, select_diverse
from kdray.losses.pad_term import GroupLayoutError, pad_term
from kdray.models import Student
from kdray.models.tiny import tiny_causal_lm
from kdray.models.tokenizer import char_tokenizer
from kdray.train.step import StepConfig, student_forward, to_tensors, train_step

TOK = char_tokenizer()
RESPONSES = ["12", "13 apples", "x", "twelve", "7", "7+5=12", "1", "no"]


def grouped_batch(n: int, groups: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rows = [(f"q{g}: 7+5=", RESPONSES[(g * n + i) % len(RESPONSES)]) for g in range(groups) for i in range(n)]
    examples = [tokenize_example(TOK, p, r, max_prompt_tokens=64, max_response_tokens=32) for p, r in rows]
    batch = collate(examples, TOK.pad_token_id)
    batch["group_pos"] = [i % n for i in range(len(rows))]
    batch["teacher_reward"] = torch.randn(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return to_tensors(batch)


def student(seed: int = 0) -> Student:
    return Student(tiny_causal_lm(len(TOK), hidden_size=32, num_layers=1, num_heads=1, seed=seed))


# --- the term ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["jsd", "vanilla"])
def test_pad_term_equals_a_brute_force_computation_from_pad_loss(loss):
    n, groups, beta = 3, 2, 10.0
    batch = grouped_batch(n, groups)
    model = student()
    logits, loss_batch = student_forward(model, batch)
    loss_batch["num_groups"] = torch.tensor(5)  # the step's global count: this micro-batch holds 2 of 5
    value, subs = pad_term(logits, loss_batch, beta=beta, loss=loss)

    # brute force: row by row, position by position, from the full logits
    full = model(batch["input_ids"], batch["attention_mask"])[0].double()
    rewards = []
    for row in range(n * groups):
        ids, resp = batch["input_ids"][row], batch["response_mask"][row] & batch["attention_mask"][row]
        lps = [torch.log_softmax(full[row, t - 1], -1)[ids[t]] for t in range(1, len(ids)) if resp[t]]
        rewards.append(beta * torch.stack(lps).mean())
    student_r = torch.stack(rewards).reshape(groups, n)
    teacher_r = batch["teacher_reward"].double().reshape(groups, n)
    expected = pad_loss(student_r, teacher_r, loss) * groups / 5
    assert torch.allclose(value.double(), expected, atol=1e-5, rtol=1e-4)
    assert float(value.detach()) > 0 and set(subs) == {"top1", "student_reward"}

    value.backward()  # the gradient reaches the student, never the teacher's rewards
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_groups_in_two_micro_batches_train_exactly_like_one_batch():
    batch = grouped_batch(4, 2, seed=3)
    halves = [{k: v[:4] if v.dim() else v for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    objective = build_objective([{"name": "pad", "params": {"beta": 10.0}}])
    grads = []
    for micro in ([batch], halves):
        model = student(seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        logs = train_step(model, opt, objective, micro, StepConfig(grad_clip=None))
        grads.append((logs["pad"], [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_split_group_is_refused_naming_the_row():
    batch = grouped_batch(4, 2)
    logits, loss_batch = student_forward(student(), batch)
    loss_batch["group_pos"] = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0])
    with pytest.raises(GroupLayoutError, match="row 4 has group_pos 1, expected 0"):
        pad_term(logits, loss_batch)
    loss_batch["group_pos"] = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with pytest.raises(GroupLayoutError, match=r"multiple of method_params\.n"):
        pad_term(logits, loss_batch)


# --- config and declaration --------------------------------------------------------------------------


def test_pad_is_declared_listed_and_needs_no_streamed_signal(capsys):
    from kdray.cli import main
    from kdray.losses import TERMS
    from kdray.train.trainer import needs_generations, needs_pool, needs_signal

    assert main(["methods", "--json"]) == 0
    pad = {m["name"]: m for m in json.loads(capsys.readouterr().out)}["pad"]
    assert pad["params"] == {"n": 4, "samples": 5, "temperature": 1.0, "top_p": 0.95, "alpha": 0.0}
    assert pad["terms"] == [
        {"name": "pad", "weight": 1.0, "params": {"beta": 10.0, "loss": "jsd", "jsd_form": "textbook"}}
    ]
    assert pad["tokenizer"] == "text_only" and pad["data"] == "off_policy" and not pad["pairs"]
    assert not TERMS["pad"].reads_signal({})
    cfg = config_from_dict({"objective": {"method": "pad"}, "train": {"batch_size": 8}})
    assert not (needs_signal(cfg) or needs_generations(cfg) or needs_pool(cfg))


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"train": {"batch_size": 6}}, r"train.batch_size = 6 .* multiple of objective.method_params.n = 4"),
        ({"objective": {"method": "pad", "method_params": {"samples": 3}}}, r"method_params.samples = 3"),
        ({"objective": {"method": "pad", "method_params": {"n": 9}}}, r"method_params.n = 9"),
        ({"objective": {"method": "pad", "method_params": {"alpha": 2}}}, r"method_params.alpha = 2"),
        ({"objective": {"method": "pad", "on_policy_fraction": 0.5}}, r"on_policy_fraction 0"),
    ],
)
def test_config_refuses_what_would_break_groups(section, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"objective": {"method": "pad"}, "train": {"batch_size": 8}, **section})


# --- tiny teacher ------------------------------------------------------------------------------------


def save_tiny(path, *, seed: int, max_positions: int = 512):
    from kdray.models.build import export_student

    model = tiny_causal_lm(len(TOK), hidden_size=32, num_layers=1, num_heads=1, seed=seed,
                           max_positions=max_positions)  # fmt: skip
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, attr, getattr(TOK, attr))
    return str(export_student(model, TOK, path))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("pad") / "teacher", seed=7)


def test_judge_reads_letters_from_one_token_in_both_orders(tmp_path):
    """α = 0.5: the reward mixes the mean log-prob with MCQ scores read from the top-20 log-probs of the
    judge's answer token, every pair asked in both A/B orders; checked against a direct computation."""
    from kdray.models.loading import load_causal_lm
    from kdray.teacher import Teacher
    from kdray.train.pad_data import judge_groups

    path = save_tiny(tmp_path / "judge", seed=11, max_positions=1024)
    question, responses = "What is 7+5?", ["12", "13", "it is 12", "7"]
    batch = {"prompt": [question], "responses": [json.dumps(responses)], "status": ["kept"]}
    out = judge_groups(Teacher(path, temperature=1.0, top_k=1), batch, alpha=0.5, beta=10.0)
    got = json.loads(out["teacher_reward"][0])

    model, tokenizer = load_causal_lm(path, device="cpu")
    model.eval()

    def next_token(text: str) -> torch.Tensor:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)

    def letter(lp: torch.Tensor, which: str) -> float:
        top = lp.topk(20)
        merged: dict[str, float] = {}
        for tid, v in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            text = tokenizer.decode([tid])
            merged[text] = (
                float(torch.logaddexp(torch.tensor(merged[text]), torch.tensor(v))) if text in merged else v
            )
        return letter_probability(merged, which)

    n = len(responses)
    wins = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                lp = next_token(mcq_prompt(question, responses[i], responses[j]))
                wins[i, j] += 0.5 * letter(lp, "A")
                wins[j, i] += 0.5 * letter(lp, "B")
    assert float(wins.max()) > 1e-6  # the letters are among the judge's top-20 tokens somewhere
    mcq = [math.log((1e-8 + float(wins[i].sum())) / (n - 1)) for i in range(n)]

    def mean_logprob(response: str) -> float:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        head = head["input_ids"] if hasattr(head, "keys") else head
        tail = tokenizer(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lps = torch.log_softmax(model(torch.tensor([head + tail])).logits[0].double(), -1)
        return sum(float(lps[len(head) + k - 1, t]) for k, t in enumerate(tail)) / len(tail)

    expected = [10.0 * (0.5 * mean_logprob(r) + 0.5 * m) for r, m in zip(responses, mcq, strict=True)]
    assert got == pytest.approx(expected, abs=2e-3)
    assert json.loads(out["mcq"][0]) == pytest.approx(mcq, abs=1e-4)


# --- through Ray -------------------------------------------------------------------------------------

ray = pytest.importorskip("ray")


def test_groups_stay_whole_through_ray_data_and_a_two_worker_split(ray_session):
    from kdray.data import generate_arithmetic, pipeline
    from kdray.train.batches import micro_batches

    pipeline.deterministic_order()
    n = 4
    records = generate_arithmetic(7, seed=3, difficulty=1)
    rows = [{**r, "response": f"{r['response']}#{i}", "group_pos": i, "teacher_reward": float(i)}
            for r in records for i in range(n)]  # fmt: skip
    rows = pipeline.grouped_rows(rows, group_size=n, block_rows=8, splits=2)
    assert len(rows) == 16  # 28 rows cut to whole global batches of 8 x 2
    ds = pipeline.tokenized(
        pipeline.records_dataset(rows, block_rows=8), "tiny", max_prompt_tokens=160, max_response_tokens=96,
        chat_template=True, batch_size=8,
    )  # fmt: skip
    shards = ds.streaming_split(2, equal=True)
    seen: list[list[dict]] = [[], []]

    def consume(i: int) -> None:
        seen[i].extend(micro_batches(shards[i], 8, TOK.pad_token_id, max_epochs=1))

    threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    ids = []
    for batch in seen[0] + seen[1]:
        tensors = to_tensors(batch)
        assert tensors["group_pos"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
        assert tensors["teacher_reward"].dtype == torch.float32
        for g in (0, 4):
            assert len({batch["id"][g + k] for k in range(n)}) == 1
            ids.append(batch["id"][g])
    assert len(seen[0]) == len(seen[1]) == 1 and sorted(ids) == sorted(r["id"] for r in records[:4])
    with pytest.raises(ValueError, match="multiple of it"):
        pipeline.grouped_rows(rows, group_size=n, block_rows=6)


def test_pad_rows_sample_the_initial_student_and_score_with_the_teacher(ray_session, tiny_teacher):
    from kdray.data import generate_arithmetic
    from kdray.models.build import build_student
    from kdray.teacher import Teacher
    from kdray.train.pad_data import pad_rows, prompt_seed
    from kdray.train.trainer import teacher_pool

    cfg = config_from_dict(
        {
            "model": {"name_or_path": "tiny", "tiny_layers": 1, "tiny_hidden": 32},
            "teacher": {"name_or_path": tiny_teacher, "num_cpus": 1},
            "objective": {"method": "pad", "max_new_tokens": 8, "method_params": {"alpha": 1.0}},
            "train": {"batch_size": 4, "max_steps": 2, "seed": 5},
        }
    )
    records = generate_arithmetic(10, seed=1, difficulty=1)
    with teacher_pool(cfg, tiny_teacher) as pool:
        data = pad_rows(cfg, records, teacher_path=tiny_teacher, teacher=pool)
    assert data.stats["prompts_sampled"] == 4  # 2 groups needed, a quarter more, plus one
    # every kept prompt, in whole global batches (the loop reads the first max_steps of them)
    assert data.stats["prompts_kept"] + data.stats["dropped_duplicates"] + data.stats["dropped_empty"] == 4
    groups = len(data.rows) // 4
    assert (
        groups == data.stats["prompts_kept"] >= 2
        and [r["group_pos"] for r in data.rows] == [0, 1, 2, 3] * groups
    )

    # an independent computation: the same initial student, the same per-prompt seed, the teacher's reward
    model, tokenizer = build_student("tiny", teacher_path=tiny_teacher, tiny_layers=1, tiny_hidden=32, seed=5)
    sampler = Teacher(model=model.eval(), tokenizer=tokenizer, top_k=1)
    teacher = Teacher(tiny_teacher, temperature=1.0, top_k=1)
    for g in range(groups):
        group = data.rows[4 * g : 4 * g + 4]
        prompt = group[0]["prompt"]
        assert {r["prompt"] for r in group} == {prompt}
        outs = sampler.generate([prompt], n=5, temperature=1.0, top_p=0.95, max_new_tokens=8,
                                seed=prompt_seed(5, prompt))[0]  # fmt: skip
        texts = [o["text"] for o in outs]
        kept = [texts[i] for i in select_diverse(texts, 4)]
        assert [r["response"] for r in group] == kept and len(set(kept)) == 4
        expected = teacher.reward([prompt] * 4, kept)
        got = [r["teacher_reward"] for r in group]
        assert all(math.isfinite(x) for x in got)
        assert got == pytest.approx([10.0 * float(x) for x in expected], abs=1e-4)


def test_pad_rows_judge_the_students_text_with_a_teacher_of_another_tokenizer(ray_session, tmp_path):
    """PAD reads the teacher as text only: a character-level student's samples are scored by a BPE
    teacher on its own tokenization of the same text, with no refusal and no shared vocabulary."""
    from kdray.config import with_overrides
    from kdray.data import generate_arithmetic
    from kdray.models.bpe import bpe_tokenizer, save_bpe_checkpoint
    from kdray.models.tiny import save_tiny_checkpoint
    from kdray.teacher import Teacher
    from kdray.teacher.preflight import VocabularyMismatchError, preflight_config
    from kdray.train.pad_data import pad_rows
    from kdray.train.trainer import teacher_pool

    records = generate_arithmetic(10, seed=1, difficulty=1)
    bpe = bpe_tokenizer([f"{r['prompt']}\n{r['response']}" for r in generate_arithmetic(200, seed=2)], 320)
    teacher_dir = str(save_bpe_checkpoint(tmp_path / "teacher", bpe, hidden_size=32, num_layers=1, seed=3))
    student_dir = str(save_tiny_checkpoint(tmp_path / "student", hidden_size=32, num_layers=1, seed=4))
    assert len(bpe) != len(char_tokenizer())
    cfg = config_from_dict(
        {
            "model": {"name_or_path": student_dir},
            "teacher": {"name_or_path": teacher_dir, "num_cpus": 1},
            "objective": {"method": "pad", "max_new_tokens": 8, "method_params": {"alpha": 1.0}},
            "train": {"batch_size": 4, "max_steps": 2, "seed": 5},
        }
    )
    preflight_config(cfg, teacher_dir)  # PAD's declaration: text only, so the pair is accepted
    with pytest.raises(VocabularyMismatchError):  # a method on one vocabulary is refused
        preflight_config(with_overrides(cfg, {"objective.method": "supervised_kd"}), teacher_dir)
    with teacher_pool(cfg, teacher_dir) as pool:
        data = pad_rows(cfg, records, teacher_path=teacher_dir, teacher=pool)
    groups = len(data.rows) // 4
    assert groups >= 2
    teacher = Teacher(teacher_dir, temperature=1.0, top_k=1)
    for g in range(groups):
        group = data.rows[4 * g : 4 * g + 4]
        prompt, responses = group[0]["prompt"], [r["response"] for r in group]
        expected = teacher.reward([prompt] * 4, responses)  # the BPE teacher on its own tokens
        got = [r["teacher_reward"] for r in group]
        assert all(math.isfinite(x) for x in got)
        assert got == pytest.approx([10.0 * float(x) for x in expected], abs=1e-4)
