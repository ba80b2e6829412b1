"""The Teacher (transformers backend), model loading, preflight and the layer-pruned student."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from kdray.models.loading import ModelNotFoundError, layer_pruned_student, load_causal_lm
from kdray.models.tiny import save_tiny_checkpoint
from kdray.teacher import Teacher, VocabularyMismatchError, check_vocabularies, preflight


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", hidden_size=32, num_layers=2, seed=3)


@pytest.fixture(scope="module")
def teacher(tiny_dir):
    return Teacher(str(tiny_dir), top_k=7, batch_size=2)


def direct_logprobs(model, seq):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)


def test_logprobs_equal_direct_forward_exactly(teacher):
    seq = [5, 17, 9, 30, 44, 12]
    sig = teacher.logprobs({"input_ids": [seq]})
    ref = direct_logprobs(teacher.backend.model, seq)[:-1]  # row t predicts token t+1
    vals, ids = ref.topk(7, -1)
    assert np.array_equal(sig["topk_ids"][0, 1:], ids.numpy())
    assert np.array_equal(sig["topk_logprobs"][0, 1:], vals.numpy())
    realized = ref.gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
    assert np.array_equal(sig["token_logprobs"][0, 1:], realized.numpy())
    assert sig["mask"].tolist() == [[False] + [True] * 5]


def test_padded_batches_match_single_sequences(teacher):
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # batch_size=2: two forward batches
    sig = teacher.logprobs({"input_ids": seqs})
    assert sig["topk_ids"].shape == (3, 7, 7) and sig["topk_ids"].dtype == np.int32
    for i, seq in enumerate(seqs):
        one = teacher.logprobs({"input_ids": [seq]})
        n = len(seq)
        np.testing.assert_allclose(sig["topk_logprobs"][i, :n], one["topk_logprobs"][0], atol=1e-5)
        np.testing.assert_allclose(sig["token_logprobs"][i, :n], one["token_logprobs"][0], atol=1e-5)
        assert not sig["mask"][i, n:].any()


def test_padded_array_input_with_response_mask(teacher):
    ids = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    attn = ids != 0
    attn[1] = True
    resp = np.array([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], bool)
    sig = teacher({"input_ids": ids, "attention_mask": attn, "response_mask": resp})
    assert sig["mask"].tolist() == resp.tolist()
    assert "input_ids" in sig  # map_batches keeps the batch's own columns
    ref = teacher.score([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], prompt_lengths=[2, 3])
    assert np.array_equal(ref["mask"], sig["mask"]) and np.array_equal(ref["topk_ids"], sig["topk_ids"])


def test_full_vocabulary_k_and_k_too_large(tiny_dir, teacher):
    full = teacher.logprobs(
        {"input_ids": [[5, 6, 7]]}, k=None if teacher.top_k is None else teacher.vocab_size
    )
    np.testing.assert_allclose(np.exp(full["topk_logprobs"][0, 1:]).sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=rf"top_k=500 .* allowed 1\.\.{len(teacher.tokenizer)}"):
        Teacher(str(tiny_dir), top_k=500)


def test_generation_seeded_greedy_and_eos(teacher):
    a = teacher.generate(["2+3=", "hi"], n=3, max_new_tokens=6, temperature=1.0, seed=7)
    b = teacher.generate(["2+3=", "hi"], n=3, max_new_tokens=6, temperature=1.0, seed=7)
    assert [[s["token_ids"] for s in p] for p in a] == [[s["token_ids"] for s in p] for p in b]
    assert len(a) == 2 and all(len(p) == 3 for p in a)
    greedy = teacher.generate(["2+3="], temperature=0.0, max_new_tokens=5)[0][0]
    seq = list(greedy["prompt_ids"])
    for _ in range(5):  # manual argmax decoding
        seq.append(int(direct_logprobs(teacher.backend.model, seq)[-1].argmax()))
    assert greedy["token_ids"] == _cut_eos(seq[len(greedy["prompt_ids"]) :], teacher.tokenizer.eos_token_id)


def _cut_eos(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_chat_template_is_the_models_own(teacher):
    ids = teacher.encode_prompt("2+2?")
    assert teacher.tokenizer.decode(ids) == "<|user|>2+2?<|end|><|assistant|>"


def test_reward_is_length_normalised_logprob(teacher):
    r = teacher.reward(["2+2?"], ["four"])
    head = teacher.encode_prompt("2+2?")
    tail = teacher.tokenizer("four", add_special_tokens=False)["input_ids"]
    lp = direct_logprobs(teacher.backend.model, head + tail)
    manual = np.mean([lp[len(head) + i - 1, t].item() for i, t in enumerate(tail)])
    assert r[0] == pytest.approx(manual, abs=1e-5)


def test_bad_inputs_are_named(tiny_dir, teacher):
    with pytest.raises(ValueError, match="prompt list is empty"):
        teacher.generate([])
    with pytest.raises(ValueError, match="empty batch"):
        teacher.logprobs({"input_ids": []})
    long = list(range(5, 40)) * 20  # 700 tokens > 512 context of the tiny model
    with pytest.raises(
        ValueError, match=r"sequence 1 has 700 tokens, more than the teacher's context of 512"
    ):
        teacher.score([[5, 6], long])
    cut = Teacher(str(tiny_dir), top_k=3, truncate=True).score([[5, 6], long])
    assert (
        cut["mask"].shape == (2, 700) and cut["mask"][1, :512].sum() == 511 and not cut["mask"][1, 512:].any()
    )
    with pytest.raises(ValueError, match="reward: 2 prompts but 1 responses"):
        teacher.reward(["a", "b"], ["c"])


def test_missing_model_path_names_what_was_searched(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        Teacher(str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(ModelNotFoundError, match="hub cache"):
        load_causal_lm("kdray-test-org/definitely-not-a-model")


def _config_and_tokenizer_only(src, dst):
    """A checkpoint directory without weights: preflight must not need them."""
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


def test_preflight_refuses_mismatched_vocabularies_before_loading_weights(tmp_path, tiny_dir):
    from kdray.models.tokenizer import char_tokenizer

    same = _config_and_tokenizer_only(tiny_dir, tmp_path / "same")
    plan = preflight(str(tiny_dir), str(same), method="xkd")
    n = len(char_tokenizer())
    assert plan.same_tokenizer and plan.vocab_size == n and not plan.needs_slicing
    other = save_tiny_checkpoint(tmp_path / "other-src", hidden_size=32, num_layers=1)
    char_tokenizer("0123456789+-=abc").save_pretrained(other)  # a different tokenizer, no weights needed
    other = _config_and_tokenizer_only(other, tmp_path / "other")
    with pytest.raises(VocabularyMismatchError, match=rf"teacher .*{n} tokens.* vs student .*23 tokens"):
        preflight(str(tiny_dir), str(other), method="xkd")
    assert not preflight(str(tiny_dir), str(other), method="seqkd").same_tokenizer  # text-only: allowed


def test_padded_heads_are_sliced_to_the_tokenizer(teacher):
    tok = teacher.tokenizer
    plan = check_vocabularies(tok, tok, teacher_head=len(tok) + 14, student_head=len(tok) + 6, method="gkd")
    assert plan.vocab_size == len(tok) and plan.needs_slicing
    with pytest.raises(VocabularyMismatchError, match="student head has 100 outputs"):
        check_vocabularies(tok, tok, teacher_head=128, student_head=100, method="gkd")


def test_teacher_with_padded_head_serves_tokenizer_ids_only(tmp_path):
    from kdray.models.tokenizer import char_tokenizer

    n = len(char_tokenizer())
    path = save_tiny_checkpoint(tmp_path / "padded", vocab_size=n + 16, hidden_size=32, num_layers=1)
    t = Teacher(str(path), top_k=None)
    sig = t.logprobs({"input_ids": [[5, 6, 7]]})
    assert t.vocab_size == n and sig["topk_ids"].shape[-1] == n and sig["topk_ids"].max() < n


def test_layer_pruned_student_copies_every_mth_layer(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "deep", hidden_size=32, num_layers=5, seed=1)
    teacher_model, _ = load_causal_lm(str(path))
    student = layer_pruned_student(teacher_model, keep_every=2)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    for new, old in zip(student.model.layers, [0, 2, 4], strict=True):
        for (n, p), (_, q) in zip(
            new.named_parameters(), teacher_model.model.layers[old].named_parameters(), strict=True
        ):
            assert torch.equal(p, q), n
    assert torch.equal(student.lm_head.weight, teacher_model.lm_head.weight)
    with torch.no_grad():  # independent copies: training the student never touches the teacher
        student.lm_head.weight.add_(1.0)
    assert not torch.equal(student.lm_head.weight, teacher_model.lm_head.weight)
    out = student.generate(
        torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False
    )  # KV cache indexes fine
    assert out.shape == (1, 6)


@pytest.mark.slow
def test_real_smollm2_teacher_matches_transformers_and_prunes(smollm2_dir):
    t = Teacher(str(smollm2_dir), top_k=20, batch_size=2)
    assert t.vocab_size == 49152
    prompts = ["What is 12 + 30?", "Translate to German: a dog runs."]
    seqs = [t.encode_prompt(p) for p in prompts]
    sig = t.score(seqs)
    for i, seq in enumerate(seqs):
        ref = direct_logprobs(t.backend.model, seq)[:-1]
        np.testing.assert_allclose(
            sig["topk_logprobs"][i, 1 : len(seq)], ref.topk(20, -1).values.numpy(), atol=1e-4
        )
        realized = ref.gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1).numpy()
        np.testing.assert_allclose(sig["token_logprobs"][i, 1 : len(seq)], realized, atol=1e-4)
    answer = t.generate(["What is 2 + 2? Answer with a number."], temperature=0, max_new_tokens=12)[0][0][
        "text"
    ]
    assert "4" in answer
    student = layer_pruned_student(t.backend.model, keep_every=3)
    assert student.config.num_hidden_layers == 10
    assert sum(p.numel() for p in student.parameters()) < 0.6 * sum(
        p.numel() for p in t.backend.model.parameters()
    )


@pytest.mark.gpu
def test_teacher_on_gpu_uses_bf16_and_matches_cpu(tiny_dir):
    gpu = Teacher(str(tiny_dir), top_k=5, device="cuda")
    assert gpu.info()["device"].startswith("cuda")
    assert next(gpu.backend.model.parameters()).dtype == torch.bfloat16
    cpu = Teacher(str(tiny_dir), top_k=5, device="cpu")
    seqs = [[5, 6, 7, 8, 9]]
    np.testing.assert_allclose(
        gpu.score(seqs)["token_logprobs"], cpu.score(seqs)["token_logprobs"], atol=5e-2
    )
