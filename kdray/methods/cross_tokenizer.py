"""The cross-tokenizer losses (`objective.cross_tokenizer`), declared as plain data like the methods.

A teacher whose tokenizer differs from the student's shares neither positions nor vocabulary columns
with it, so a method's id-by-id divergence cannot be computed. Setting `objective.cross_tokenizer`
replaces that divergence by ULD (Boizard et al. 2024) or GOLD's hybrid loss (TRL), computed on response
spans both tokenizations cover (`kdray.losses.cross_tokenizer`). The knobs and their reference defaults
live here, with no torch import, because the config resolves them when it loads; the loss registry
(`kdray.losses.objective.TERMS`) reads the same declaration, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: the losses `objective.cross_tokenizer` may name; each is also the name of its loss term
CROSS_TOKENIZER_LOSSES: tuple[str, ...] = ("uld", "gold")

_SHARED: dict[str, Any] = {"temperature": 1.0, "align": "text", "strategy": "observed"}

#: loss -> {knob: reference default}, set in a config under `objective.cross_tokenizer_params`
CROSS_TOKENIZER_PARAMS: dict[str, dict[str, Any]] = {
    # Nicolas-BZRD/llm-recipes: crossentropy_weight 1 (the loss default), distil_factor 1.5, T = 1
    "uld": {"ce_weight": 1.0, "distil_weight": 1.5, **_SHARED},
    # trl.experimental.gold: uld_crossentropy_weight 0, uld_distillation_weight 1, beta 0.5, adaptive
    # matched/unmatched weights (None), uld_token_merge_strategy "observed"
    "gold": {
        "ce_weight": 0.0,
        "distil_weight": 1.0,
        "beta": 0.5,
        "matched_weight": None,
        "unmatched_weight": None,
        **_SHARED,
    },
}

#: knob -> what it does (docs/cross_tokenizer.md lists the same)
KNOB_HELP: dict[str, str] = {
    "ce_weight": "weight of cross-entropy on the student's own tokens of the response",
    "distil_weight": "weight of the distillation part (ULD, or GOLD's hybrid)",
    "beta": "GOLD: β of the generalised JSD on the matched vocabulary columns",
    "matched_weight": "GOLD: weight of the matched part; null = matched share of the teacher's vocabulary",
    "unmatched_weight": "GOLD: weight of the sorted-L1 part; null = 1 - matched share",
    "temperature": "temperature of both the student's and the teacher's log-probs",
    "align": "`text`: pair spans of the response both sides cover; `position`: pair the t-th tokens",
    "strategy": "how a span of several tokens becomes one row: `observed` (first) or `bayesian` (last)",
}

_CHOICES = {"align": ("text", "position"), "strategy": ("observed", "bayesian")}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def cross_tokenizer_params(loss: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs of cross-tokenizer loss `loss`: its reference defaults overridden by `given`.

    Raises ValueError naming the knob, the bad value and what is allowed; the config prefixes the field.
    """
    if loss not in CROSS_TOKENIZER_PARAMS:
        raise ValueError(
            f"unknown cross-tokenizer loss {loss!r}; choose one of {list(CROSS_TOKENIZER_LOSSES)}"
        )
    defaults = CROSS_TOKENIZER_PARAMS[loss]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{loss!r} has no parameter {unknown[0]!r}; its parameters: {', '.join(defaults)}")
    params = {**defaults, **given}
    for key, value in params.items():
        if key in _CHOICES:
            ok, allowed = value in _CHOICES[key], " or ".join(repr(c) for c in _CHOICES[key])
        elif key in ("matched_weight", "unmatched_weight"):
            ok, allowed = value is None or (_number(value) and value >= 0), "null or a finite number >= 0"
        elif key == "beta":
            ok, allowed = _number(value) and 0.0 <= value <= 1.0, "a number in [0, 1]"
        elif key == "temperature":
            ok, allowed = _number(value) and value > 0, "a finite number > 0"
        else:  # the two weights
            ok, allowed = _number(value) and value >= 0, "a finite number >= 0"
        if not ok:
            raise ValueError(f"{key} = {value!r} is invalid for {loss!r}; allowed: {allowed}")
    return {k: float(v) if _number(v) else v for k, v in params.items()}


def cross_tokenizer_terms(loss: str, params: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The objective `objective.cross_tokenizer: <loss>` trains: one term of that name, weight 1, with
    the resolved knobs (its cross-entropy part is the `ce_weight` knob, not a second term)."""
    return ({"name": loss, "weight": 1.0, "params": dict(params)},)


def _refuse(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field} = {value!r} is invalid; allowed: {allowed}")


def resolve_cross_tokenizer(
    loss: str | None, given: Mapping[str, Any], method: Any, on_policy_fraction: float
) -> tuple[dict[str, Any], tuple[dict[str, Any], ...]]:
    """(resolved knobs, the terms it trains) of `objective.cross_tokenizer`; ({}, ()) when off.

    The loss replaces a distribution-matching method's divergence on the data's (or the teacher's
    generated) responses; a text-only method compares no distributions, and student samples are not
    re-tokenised for the teacher, so those combinations are refused where the fix is a config edit.
    Messages name the config field (the config raises them as ConfigError).
    """
    if loss is None:
        if given:
            _refuse("objective.cross_tokenizer_params", dict(given),
                    "empty unless objective.cross_tokenizer is set (uld or gold)")  # fmt: skip
        return {}, ()
    if method.tokenizer != "same_vocab":
        _refuse("objective.cross_tokenizer", loss, f"null for method {method.name!r} (tokenizer rule "
                f"{method.tokenizer!r}): the loss replaces a same_vocab method's divergence, and this "
                "method accepts any two tokenizers as it is")  # fmt: skip
    if method.data == "adaptive" or on_policy_fraction > 0.0:
        _refuse("objective.cross_tokenizer", loss, f"null with method {method.name!r} at on_policy_fraction "
                f"{on_policy_fraction:g} (data: {method.data}): student samples are not re-tokenised for "
                "the teacher; use objective.on_policy_fraction: 0 with an off-policy method (supervised_kd, "
                "or gkd)")  # fmt: skip
    try:
        params = cross_tokenizer_params(loss, given)
    except ValueError as err:
        raise ValueError(f"objective.cross_tokenizer_params: {err}") from None
    return params, cross_tokenizer_terms(loss, params)


def check_cross_tokenizer_terms(
    loss: str | None, terms: list[dict[str, Any]], reference: tuple[dict[str, Any], ...]
) -> None:
    """With `cross_tokenizer` set the objective is exactly its term (knobs in `cross_tokenizer_params`);
    without it no term may be a cross-tokenizer loss (nothing would serve the signal it reads)."""
    names = [t["name"] for t in terms]
    if loss is None:
        stray = [n for n in names if n in CROSS_TOKENIZER_LOSSES]
        if stray:
            _refuse("objective.terms", names, f"no {stray[0]!r} term unless objective.cross_tokenizer: "
                    f"{stray[0]} is set (it makes the teacher score its own tokenization, which the term "
                    "reads)")  # fmt: skip
        return
    expected = [
        {"name": t["name"], "weight": float(t["weight"]), "params": dict(t["params"])} for t in reference
    ]
    if terms != expected:
        _refuse("objective.terms", names, f"unset (null) with objective.cross_tokenizer = {loss!r}: the "
                f"objective is that one term, {expected[0]['params']}; set its knobs in "
                "objective.cross_tokenizer_params (ce_weight adds the cross-entropy)")  # fmt: skip
