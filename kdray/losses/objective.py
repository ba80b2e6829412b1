"""Loss terms by name and the objective: a weighted list of terms -> one callable.

Every term has the loss API of ARCHITECTURE.md,
    term(student_logits, batch, teacher_signal, *, num_tokens, chunk_size, **params) -> (scalar, {sub: value}),
where `batch` carries `target_ids (B, T)` and `mask (B, T)` (plus the reward head's `reward_mu` and
`reward_log_sigma` for X-KD) and `teacher_signal` is dense logits or a sparse top-k signal. The
objective logs every term by name (unweighted) and every sub-term as `term/sub`.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from kdray.losses.ava import ava_pref_loss, ava_pref_term
from kdray.losses.cross_tokenizer_term import cross_tokenizer_term
from kdray.losses.divergences import DIVERGENCES, loss_dtype
from kdray.losses.minillm import minillm_loss
from kdray.losses.pad_term import pad_term
from kdray.losses.reduce import chunked_per_token, masked_mean
from kdray.losses.signal import (
    check_signal_temperature,
    full_teacher_logits,
    teacher_divergence,
    token_cross_entropy,
)
from kdray.losses.taid import taid_per_token
from kdray.losses.xkd import xkd_loss
from kdray.methods.cross_tokenizer import CROSS_TOKENIZER_LOSSES, CROSS_TOKENIZER_PARAMS

Tensor = torch.Tensor
TermResult = tuple[Tensor, dict[str, Tensor]]
TermFn = Callable[..., TermResult]


def _require(batch: Mapping[str, Tensor], key: str, term: str, hint: str) -> Tensor:
    if key not in batch:
        raise KeyError(f"loss term {term!r} needs batch[{key!r}] ({hint}); the batch has {sorted(batch)}")
    return batch[key]


def _require_signal(teacher_signal: Mapping[str, Tensor] | None, term: str) -> Mapping[str, Tensor]:
    if teacher_signal is None:
        raise ValueError(f"loss term {term!r} needs a teacher signal, but none was given for this batch")
    return teacher_signal


def ce_term(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    teacher_signal: Mapping[str, Tensor] | None = None,
    *,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> TermResult:
    """Cross-entropy on `batch['target_ids']` (labels, or teacher generations for SeqKD)."""
    targets = _require(batch, "target_ids", "ce", "the tokens to imitate")
    values = token_cross_entropy(student_logits, targets, chunk_size=chunk_size)
    return masked_mean(values, batch["mask"], num_tokens), {}


def divergence_term(
    name: str,
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    teacher_signal: Mapping[str, Tensor] | None = None,
    *,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    sparse_mode: str = "tail",
    **params: float,
) -> TermResult:
    """Divergence `name` to the teacher at every counted position (supervised KD, GKD, DistiLLM)."""
    signal = _require_signal(teacher_signal, name)
    values = teacher_divergence(
        name,
        student_logits,
        signal,
        temperature=temperature,
        sparse_mode=sparse_mode,  # type: ignore[arg-type]
        chunk_size=chunk_size,
        **params,
    )
    return masked_mean(values, batch["mask"], num_tokens), {}


def xkd_term(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    teacher_signal: Mapping[str, Tensor] | None = None,
    *,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
    **params: Any,
) -> TermResult:
    """X-KD (imitation + λ_td·TD-NLL + λ_kl·prior); the reward head's outputs come in the batch."""
    hint = "the reward head's output, see kdray.models.RewardHead"
    mu = _require(batch, "reward_mu", "xkd", hint)
    log_sigma = _require(batch, "reward_log_sigma", "xkd", hint)
    targets = _require(batch, "target_ids", "xkd", "the demonstration's tokens")
    params = {k: v for k, v in params.items() if k not in XKD_MODEL_PARAMS}  # read by the model builder
    return xkd_loss(
        student_logits,
        targets,
        batch["mask"],
        mu,
        log_sigma,
        teacher_signal=teacher_signal,
        num_tokens=num_tokens,
        chunk_size=chunk_size,
        **params,
    )


def taid_term(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    teacher_signal: Mapping[str, Tensor] | None = None,
    *,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
    t: float = 0.4,
    temperature: float = 1.0,
) -> TermResult:
    """TAID toward the interpolated target; `t` comes from a TAIDSchedule at call time (runtime)."""
    signal = _require_signal(teacher_signal, "taid")
    teacher_logits = full_teacher_logits(signal, student_logits.shape[-1])
    if teacher_logits is None:
        raise ValueError(
            "taid interpolates full teacher logits; a top-k signal cannot be interpolated exactly. "
            "Serve full logits (teacher.top_k: null) for this objective."
        )
    values = chunked_per_token(
        partial(taid_per_token, t=t, temperature=temperature),
        student_logits,
        teacher_logits,
        chunk_size=chunk_size,
    )
    return masked_mean(values, batch["mask"], num_tokens), {"t": torch.tensor(float(t))}


def minillm_term(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    teacher_signal: Mapping[str, Tensor] | None = None,
    *,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
    **params: Any,
) -> TermResult:
    """MiniLLM on student samples; the batch carries the sampling log-probs recorded at generation."""
    signal = _require_signal(teacher_signal, "minillm")
    # its rewards are the teacher's un-tempered log-probs of the sampled tokens (LMOps' reward.py)
    check_signal_temperature(signal, 1.0, "minillm")
    old = _require(batch, "old_logprobs", "minillm", "the sampling student's log-probs of its tokens")
    return minillm_loss(
        student_logits,
        batch["target_ids"],
        batch["mask"],
        signal,
        old,
        mix_logprobs=batch.get("mix_logprobs"),
        num_tokens=num_tokens,
        chunk_size=chunk_size,
        **params,
    )


#: arguments a term supplies itself (the signal, token count, chunking, sampling log-probs): no knobs
_SUPPLIED = frozenset({"teacher_signal", "num_tokens", "chunk_size", "mix_logprobs"})


def _knobs(*fns: Callable[..., Any]) -> dict[str, Any]:
    """{name: default} of the parameters with defaults of `fns` (the first one wins): a config's knobs."""
    found: dict[str, Any] = {}
    for fn in fns:
        for p in inspect.signature(fn).parameters.values():
            if p.default is not inspect.Parameter.empty and p.name not in _SUPPLIED:
                found.setdefault(p.name, p.default)
    return found


def _always(params: Mapping[str, Any]) -> bool:
    return True


def _never(params: Mapping[str, Any]) -> bool:
    return False


@dataclass(frozen=True)
class TermSpec:
    """A loss term: its function, the parameters a config may set (with their defaults), and what it reads.

    `reads_signal(params)` says whether the term reads a teacher signal (what decides the teacher pass),
    `fixed_temperature` is the temperature it reads that signal at when no parameter sets it (MiniLLM's
    rewards are un-tempered teacher log-probs), and `reward_head` whether the student needs X-KD's head.
    """

    fn: TermFn
    defaults: Mapping[str, Any]
    reads_signal: Callable[[Mapping[str, Any]], bool] = _always
    fixed_temperature: float | None = None
    reward_head: bool = False

    @property
    def params(self) -> frozenset[str]:
        """The parameters a config may set."""
        return frozenset(self.defaults)


#: the X-KD term's parameters that shape the model (read by the loop when it builds the student)
XKD_MODEL_PARAMS = {"detach_head_input": False}

#: name -> term. Divergence terms are the §1 divergences with the shared signal handling.
TERMS: dict[str, TermSpec] = {
    "ce": TermSpec(ce_term, {}, reads_signal=_never),
    **{
        name: TermSpec(partial(divergence_term, name), _knobs(divergence_term, f))
        for name, f in DIVERGENCES.items()
    },
    "xkd": TermSpec(
        xkd_term,
        {**_knobs(xkd_loss, *DIVERGENCES.values()), **XKD_MODEL_PARAMS},
        reads_signal=lambda params: params.get("variant", "divergence") != "sequence",
        reward_head=True,
    ),
    "taid": TermSpec(taid_term, _knobs(taid_term)),
    "minillm": TermSpec(minillm_term, _knobs(minillm_loss), fixed_temperature=1.0),
    # AVA-p: Bradley–Terry on the reward head's summed μ over preference pairs (the pair count comes
    # with the batch, like the token count: not a knob)
    "ava_pref": TermSpec(
        ava_pref_term,
        {k: v for k, v in _knobs(ava_pref_loss).items() if k != "num_pairs"},
        reads_signal=_never,
        reward_head=True,
    ),
    # PAD: ranking of a prompt's n responses against the teacher's rewards, which come with the rows
    # (the group count comes with the batch, like the token count: not a knob)
    "pad": TermSpec(pad_term, _knobs(pad_term), reads_signal=_never),
    # cross-tokenizer losses (`objective.cross_tokenizer`): knobs and defaults from their declaration;
    # the vocabulary map and the teacher's vocabulary size come at call time (runtime), not from configs
    **{
        name: TermSpec(partial(cross_tokenizer_term, name), dict(CROSS_TOKENIZER_PARAMS[name]))
        for name in CROSS_TOKENIZER_LOSSES
    },
}


def term_defaults(name: str) -> dict[str, Any]:
    """The default of every parameter term `name` takes (from its functions' signatures), sorted."""
    return dict(sorted(TERMS[name].defaults.items()))


#: name -> term function (the registry's functions, for callers that compute one term directly)
LOSSES: dict[str, TermFn] = {name: spec.fn for name, spec in TERMS.items()}


@dataclass(frozen=True)
class Term:
    """One weighted, parametrised term of an objective."""

    name: str
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""


def _check_term(name: str, weight: float, params: Mapping[str, Any]) -> None:
    if name not in TERMS:
        close = difflib.get_close_matches(name, list(TERMS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown loss term {name!r}; {hint}available: {sorted(TERMS)}")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"loss term {name!r}: weight={weight!r} must be a finite number >= 0")
    unknown = sorted(set(params) - TERMS[name].params)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(TERMS[name].params), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"loss term {name!r} has no parameter {unknown[0]!r}; {hint}it accepts {sorted(TERMS[name].params)}"
        )


class Objective:
    """A weighted sum of named terms; call it like a term, get `(loss, {name: value})`."""

    def __init__(self, terms: Sequence[Term]) -> None:
        if not terms:
            raise ValueError("an objective needs at least one loss term")
        labelled, seen = [], {}
        for term in terms:
            _check_term(term.name, term.weight, term.params)
            seen[term.name] = seen.get(term.name, 0) + 1
            label = term.label or (term.name if seen[term.name] == 1 else f"{term.name}#{seen[term.name]}")
            labelled.append(Term(term.name, float(term.weight), dict(term.params), label))
        self.terms = tuple(labelled)

    @property
    def needs_teacher(self) -> bool:
        """False when every term works from the data alone (SFT, sequence-level X-KD)."""
        return any(TERMS[t.name].reads_signal(t.params) for t in self.terms)

    @property
    def reward_head(self) -> dict[str, Any] | None:
        """Keyword arguments of X-KD's reward head when a term needs one (None: no head)."""
        for term in self.terms:
            if TERMS[term.name].reward_head:
                return {"detach_input": bool(term.params.get("detach_head_input", False))}
        return None

    @property
    def signal_temperature(self) -> float | None:
        """The one temperature every signal-reading term reads the teacher at (None: no term reads it).

        A top-k signal cannot be re-tempered, so the teacher is served at this temperature by default
        and terms that disagree are refused here, before any teacher pass.
        """
        wanted: dict[float, list[str]] = {}
        for term in self.terms:
            spec = TERMS[term.name]
            if not spec.reads_signal(term.params):
                continue
            temp = spec.fixed_temperature or float(term.params.get("temperature", 1.0))
            wanted.setdefault(temp, []).append(term.label)
        if len(wanted) > 1:
            detail = "; ".join(f"{', '.join(labels)} at {t:g}" for t, labels in wanted.items())
            raise ValueError(
                f"the loss terms read the teacher at different temperatures ({detail}), but one teacher "
                "signal is served at one temperature: give the terms one `temperature`"
            )
        return next(iter(wanted), None)

    def __call__(
        self,
        student_logits: Tensor,
        batch: Mapping[str, Tensor],
        teacher_signal: Mapping[str, Tensor] | None = None,
        *,
        num_tokens: int | Tensor | None = None,
        chunk_size: int | None = None,
        runtime: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> TermResult:
        """Total loss and every term by label; `runtime` adds per-call params by label (e.g. TAID's t)."""
        runtime = runtime or {}
        logs: dict[str, Tensor] = {}
        total = student_logits.new_zeros((), dtype=loss_dtype(student_logits))
        for term in self.terms:
            params = {**term.params, **runtime.get(term.label, {})}
            value, subs = LOSSES[term.name](
                student_logits, batch, teacher_signal, num_tokens=num_tokens, chunk_size=chunk_size, **params
            )
            total = total + term.weight * value
            logs[term.label] = value.detach()
            logs.update({f"{term.label}/{k}": v.detach() for k, v in subs.items()})
        logs["loss"] = total.detach()
        return total, logs


def build_objective(terms: Sequence[Any]) -> Objective:
    """Objective from config terms: anything with `name`, `weight`, `params` (e.g. config LossTerm) or dicts."""
    built = []
    for t in terms:
        if isinstance(t, Mapping):
            built.append(Term(t["name"], float(t.get("weight", 1.0)), dict(t.get("params", {}))))
        else:
            built.append(Term(t.name, float(t.weight), dict(t.params)))
    return Objective(built)
