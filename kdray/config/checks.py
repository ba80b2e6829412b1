"""The config error and the value checks every section's `__post_init__` shares."""

from __future__ import annotations

from typing import Any, NoReturn


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message says where, what was given and what is allowed."""


# --- checks shared by the __post_init__ methods -----------------------------------------------------


def fail(where: str, value: Any, allowed: str) -> NoReturn:
    raise ConfigError(f"{where} = {value!r} is invalid; allowed: {allowed}")


def at_least(obj: Any, name: str, low: float, *, strict: bool = False) -> None:
    """Checks `obj.name >= low` (`> low` when strict); None passes because it means "off"."""
    value = getattr(obj, name)
    # `not (x >= low)` also rejects NaN, which passes every plain comparison.
    if value is not None and not (value > low if strict else value >= low):
        fail(f"{obj._section}.{name}", value, f"{'>' if strict else '>='} {low}")


def between(obj: Any, name: str, low: float, high: float) -> None:
    value = getattr(obj, name)
    if not low <= value <= high:
        fail(f"{obj._section}.{name}", value, f"a number in [{low}, {high}]")


def non_empty(obj: Any, name: str) -> None:
    if not getattr(obj, name):
        fail(f"{obj._section}.{name}", getattr(obj, name), "a non-empty value")
