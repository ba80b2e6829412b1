"""Every distillation method kdray trains, each declared once in its own module of this package.

`METHODS` maps a name to its `Method`. The config resolves `method: <name>` against it (default terms,
λ, method-level knobs), the trainer reads what the method needs of the teacher and where its data comes
from, the loop builds its per-run state, the preflight reads its tokenizer rule, and `kdray methods` and
docs/methods.md print it. Adding a method is one module here plus its loss term.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from kdray.methods import ava, distillm, gkd, minillm, pad, seqkd, sft, supervised_kd, taid, xkd
from kdray.methods.base import DATA_MODES, NEEDS, TOKENIZER_RULES, Method

__all__ = [
    "DATA_MODES",
    "METHODS",
    "NEEDS",
    "TOKENIZER_RULES",
    "Method",
    "UnknownMethodError",
    "get_method",
    "method_params",
]

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        *(module.METHOD for module in (sft, supervised_kd, seqkd, gkd, minillm, distillm, taid, xkd, pad)),
        *ava.METHODS,  # AVA-d and AVA-p share one module and one objective
    )
}


class UnknownMethodError(ValueError):
    """A method name that no declaration in `kdray.methods` defines."""


def get_method(name: str) -> Method:
    """The declaration of `name`, or an UnknownMethodError naming the valid methods (and a close one)."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(str(name), list(METHODS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownMethodError(f"unknown method {name!r}; {hint}valid methods: {', '.join(METHODS)}")


def method_params(method: Method, given: Mapping[str, Any]) -> dict[str, Any]:
    """The method's knobs: its reference defaults overridden by `given`; an unknown key is refused."""
    unknown = sorted(set(given) - set(method.params))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(method.params), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        valid = ", ".join(method.params) or "none"
        raise ValueError(f"method {method.name!r} has no parameter {key!r}; {hint}its parameters: {valid}")
    return {**method.params, **given}
