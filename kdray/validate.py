"""Checks a whole config against the method declarations and the loss registry, before any work.

`load_config` checks each section on its own with the stdlib only; what needs the loss registry (term
names, their parameters, the temperature the loss reads the teacher at) is checked here. Every command
that takes a config calls `validate_config` before it trains, scores or loads a teacher, so a typo
costs seconds, not a teacher pass.
"""

from __future__ import annotations

import logging
from typing import Any

from kdray.config import Config, ConfigError

logger = logging.getLogger(__name__)

__all__ = ["describe_resolved", "teacher_temperature", "validate_config"]


def _objective(cfg: Config) -> Any:
    from kdray.losses import build_objective

    try:
        return build_objective(cfg.objective.terms or ())
    except (KeyError, ValueError) as err:
        raise ConfigError(f"objective.terms: {err}") from None


def teacher_temperature(cfg: Config) -> float:
    """The temperature the teacher serves its log-probs at: `teacher.temperature`, else the one the loss
    terms read the teacher at (1.0 when no term reads a signal)."""
    if cfg.teacher.temperature is not None:
        return float(cfg.teacher.temperature)
    try:
        loss_t = _objective(cfg).signal_temperature
    except ValueError as err:
        raise ConfigError(f"objective.terms: {err}") from None
    return 1.0 if loss_t is None else float(loss_t)


def validate_config(cfg: Config) -> None:
    """Raise ConfigError (naming the field and the fix) for anything that would fail after work began."""
    objective = _objective(cfg)
    try:
        loss_t = objective.signal_temperature
    except ValueError as err:
        raise ConfigError(f"objective.terms: {err}") from None
    served = cfg.teacher.temperature
    if (
        loss_t is not None
        and served is not None
        and abs(served - loss_t) > 1e-9
        and cfg.teacher.top_k is not None
    ):
        raise ConfigError(
            f"teacher.temperature = {served:g} but the loss reads the teacher at temperature {loss_t:g}, and a "
            f"top-k signal (teacher.top_k = {cfg.teacher.top_k}) cannot be re-tempered. Remove "
            f"teacher.temperature (it then follows the loss), set it to {loss_t:g}, or serve the full "
            "vocabulary (teacher.top_k: null)."
        )
    if any(t.name == "minillm" for t in objective.terms) and cfg.objective.sampling_temperature != 1.0:
        raise ConfigError(
            f"objective.sampling_temperature = {cfg.objective.sampling_temperature:g}: the minillm term's PPO "
            "ratio and rewards use the student's log-probs at temperature 1, as the reference samples; set "
            "objective.sampling_temperature: 1.0"
        )
    _check_cross_tokenizer(cfg)
    if any(t.name == "taid" for t in objective.terms) and cfg.teacher.top_k is not None:
        raise ConfigError(
            f"teacher.top_k = {cfg.teacher.top_k}: the taid term interpolates full teacher logits, which a "
            "top-k signal does not hold; set teacher.top_k: null"
        )


def _check_cross_tokenizer(cfg: Config) -> None:
    """A cross-tokenizer loss replaces a method's divergence; a method whose own loss reads the teacher
    id by id (X-KD, TAID) would silently become another method, so it is refused."""
    loss = cfg.objective.cross_tokenizer
    if loss is None:
        return
    from kdray.losses import TERMS
    from kdray.losses.divergences import DIVERGENCES
    from kdray.methods import get_method

    method = get_method(cfg.objective.method)
    own = [
        t["name"]
        for t in method.terms
        if t["name"] not in DIVERGENCES and TERMS[t["name"]].reads_signal(t["params"])
    ]
    if own:
        raise ConfigError(
            f"objective.cross_tokenizer = {loss!r}: method {method.name!r} trains its own loss "
            f"({', '.join(own)}), which reads the teacher's distribution id by id; the cross-tokenizer loss "
            "would replace it, not adapt it. Use a method whose loss is a divergence (supervised_kd, or gkd "
            "with objective.on_policy_fraction: 0), or a student with the teacher's tokenizer"
        )
    if loss == "gold" and not cfg.objective.cross_tokenizer_params.get("ce_weight"):
        # TRL's default, kept as kdray's; but off-policy it collapsed both students of
        # workflows/cross_tokenizer.py, so say so before the run rather than after
        logger.warning(
            "objective.cross_tokenizer = 'gold' with ce_weight 0 (TRL's default): in kdray's cross-tokenizer "
            "benchmarks this made the student worse than its initialisation, with a character and with a "
            "BPE student, while with ce_weight 1 both learned the task (docs/cross_tokenizer.md). Set "
            "objective.cross_tokenizer_params.ce_weight: 1 unless you mean to reproduce TRL."
        )


def describe_resolved(cfg: Config) -> str:
    """What the config resolves to beyond its own fields: YAML comment lines for `kdray config --resolved`."""
    from kdray.methods import get_method

    method = get_method(cfg.objective.method)
    objective = _objective(cfg)
    lines = [
        f"method {method.name}: {method.summary}",
        f"  reference: {method.reference}",
        f"  needs of the teacher: {', '.join(sorted(method.needs)) or 'nothing'}; data: {method.data}; "
        f"tokenizers: {method.tokenizer}",
        f"teacher serves at temperature {teacher_temperature(cfg):g}"
        + (" (from the loss terms)" if cfg.teacher.temperature is None else ""),
        f"teacher signal read by the loss: {'yes' if objective.needs_teacher else 'no'}",
    ]
    if cfg.objective.cross_tokenizer is not None:
        lines.append(
            f"cross-tokenizer loss {cfg.objective.cross_tokenizer}: the teacher scores its own tokenization "
            "of each response, paired with the student's by the text both cover (docs/cross_tokenizer.md)"
        )
    return "\n".join(f"# {line}" for line in lines) + "\n"
