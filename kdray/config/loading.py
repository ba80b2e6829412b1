"""YAML in and out: reading a config file, converting values by the fields' type hints, overrides."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from kdray.config.checks import ConfigError
from kdray.config.schema import Config

_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float and rejects duplicate keys (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key.value!r}", key.start_mark
                    )
                seen.add(key.value)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings such as `1e5`, which `_Loader` would read back as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _read_yaml(path: str | os.PathLike[str]) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {os.fspath(path)}: {err.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{os.fspath(path)}: invalid YAML{at}: {getattr(err, 'problem', err)}") from None
    return {} if data is None else data


# --- conversion driven by the type hints ------------------------------------------------------------

_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a finite number", str: "a string"}


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(hint))
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _is_instance(value: Any, hint: Any) -> bool:
    """isinstance for the scalar hints, strict where YAML is loose: bools are not numbers, 2.5 is no int."""
    if get_origin(hint) is Literal:
        return any(value == arg and type(value) is type(arg) for arg in get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint in (bool, str) and isinstance(value, hint)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass's fields (annotations are strings in this module)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(where: str, key: Any, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean `{_join(where, close[0])}`?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown key `{_join(where, key)}`; {hint}"


def _convert(value: Any, hint: Any, where: str, nullable: bool = False) -> Any:
    """Checks a YAML value against a field's type hint and returns it in the field's type.

    Recurses through the shapes the config uses (X | None, tuple[X, ...], Mapping[str, X], dataclasses)
    so that every error names the full path of the offending value, e.g. `objective.terms.0.weight`.
    """
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):  # only `X | None` occurs
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(value, inner, where, nullable=True)
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, where)  # `train:` with nothing under it
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_convert(item, args[0], f"{where}.{i}") for i, item in enumerate(value))
    if origin is Mapping and isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {key: _convert(item, args[1], f"{where}[{key!r}]") for key, item in value.items()}
    if _is_instance(value, hint):
        return float(value) if hint is float else value
    if origin is tuple:
        expected = f"a list of {_type_name(args[0])}"
    elif origin is Mapping:
        expected = f"a mapping from strings to {_type_name(args[1])}"
    else:
        expected = _type_name(hint)
    expected += " or null" if nullable else ""
    raise ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: Any, where: str) -> Any:
    """Builds the config dataclass `cls` from a mapping; unknown and missing keys fail by their full path."""
    hints = _hints(cls)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where or 'the config'} must be a mapping with keys among {', '.join(hints)}; "
            f"got {data!r} ({type(data).__name__})"
        )
    for key in data:
        if key not in hints:
            raise ConfigError(_unknown(where, key, list(hints)))
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ConfigError(f"{where}: missing required key `{f.name}`")
    kwargs = {key: _convert(value, hints[key], _join(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        section = getattr(cls, "_section", where)
        if where == section:
            raise
        # An item of a list or mapping names its fields under the generic `_section`; say which item.
        raise ConfigError(str(err).replace(section, where, 1)) from None


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _to_plain(item) for key, item in value.items()}
    return value


def _optional_inner(hint: Any) -> Any:
    """X for `X | None`, the hint itself otherwise."""
    if get_origin(hint) in (Union, types.UnionType):
        (inner,) = [arg for arg in get_args(hint) if arg is not type(None)]
        return inner
    return hint


def _is_nested(hint: Any) -> bool:
    hint = _optional_inner(hint)
    return dataclasses.is_dataclass(hint) or get_origin(hint) in (tuple, Mapping)


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Sets `value` at a dotted path of a plain config dict, checking every part against the fields.

    Paths: `section.key`, `objective.terms.N.field`, `objective.terms.N.params.name`, and mapping entries
    such as `teacher.resources.teacher` or `tune.search_space.train.lr` (a mapping key takes the rest).
    """
    parts = path.split(".")
    node: Any = data
    hint: Any = Config
    where = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        hint = _optional_inner(hint)
        if dataclasses.is_dataclass(hint):
            if part not in _hints(hint):
                raise ConfigError(_unknown(where, part, list(_hints(hint))))
            if not last and node.get(part) is None:
                # a missing section starts empty (its defaults resolve when it is built); a field left
                # unset takes what its section resolves it to (e.g. `objective.terms`: the method's terms)
                inner = _optional_inner(_hints(hint)[part])
                if dataclasses.is_dataclass(inner):
                    node[part] = {}
                else:
                    node[part] = _to_plain(getattr(_build(hint, node, where), part))
            key: Any = part
            hint = _hints(hint)[part]
        elif get_origin(hint) is tuple:
            if not (part.isdigit() and int(part) < len(node)):
                raise ConfigError(f"`{where}` has {len(node)} item(s), so `{part}` is not one of its indices")
            key, hint = int(part), get_args(hint)[0]
        elif get_origin(hint) is Mapping:
            key, last = ".".join(parts[i:]), True
        else:
            raise ConfigError(f"`{where}` holds {_type_name(hint)}, so it has no key `{part}`")
        if last:
            node[key] = value
            return
        where, node = _join(where, part), node[key]
        kind = (
            list if get_origin(_optional_inner(hint)) is tuple else dict
        )  # a scalar hint fails at the next part
        if _is_nested(hint) and not isinstance(node, kind):
            raise ConfigError(f"cannot set `{path}`: `{where}` is {node!r}, not a {kind.__name__}")


def _apply_override(data: dict[str, Any], text: str) -> None:
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or "." not in path or "" in path.split("."):
        raise ConfigError(
            f"<overrides>: malformed override {text!r}; expected the form section.key=value, e.g. train.lr=1e-4"
        )
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"<overrides>: the value in {text!r} is not valid YAML: {err}") from None
    try:
        set_path(data, path, value)
    except ConfigError as err:
        raise ConfigError(f"<overrides>: {text!r}: {err}") from None


# --- public API -------------------------------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Builds a Config from plain data (e.g. parsed YAML); `source` prefixes the error messages."""
    try:
        return _build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML config (None = all defaults) and applies `section.key=value` overrides in order.

    Override values are YAML (`train.lr=1e-4`, `teacher.top_k=null`, `objective.terms=[{name: sft}]`).
    They are applied before the dataclasses are built, so one override may depend on another
    (`model.init=layer_pruned model.keep_every=2`), and an error is blamed on the file only if the file
    alone is invalid.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'section.key=value' strings, not one string")
    source = "<defaults>" if path is None else os.fspath(path)
    data = {} if path is None else _read_yaml(path)
    if not overrides:
        return config_from_dict(data, source)
    merged = copy.deepcopy(data)
    if not isinstance(merged, dict):
        return config_from_dict(merged, source)  # raises: the top level must be a mapping
    for text in overrides:
        _apply_override(merged, text)
    try:
        return config_from_dict(merged, f"<overrides> ({' '.join(overrides)})")
    except ConfigError as err:
        override_error = err
    config_from_dict(data, source)  # raises if the file alone is invalid, so the message names the file
    raise override_error


def with_overrides(cfg: Config, values: Mapping[str, Any]) -> Config:
    """A copy of `cfg` with values set by dotted path, e.g. a Tune trial's {"train.lr": 1e-4}."""
    data = config_to_dict(cfg)
    if "objective.method" in values and values["objective.method"] != cfg.objective.method:
        # a built config holds its method's resolved defaults: another method resolves its own
        for key, unset in (("terms", None), ("on_policy_fraction", None), ("method_params", {})):
            if f"objective.{key}" not in values:
                data["objective"][key] = unset
    if any(k.startswith("objective.cross_tokenizer") for k in values) and "objective.terms" not in values:
        data["objective"]["terms"] = None  # the cross-tokenizer term is resolved from these two fields
        loss = cfg.objective.cross_tokenizer
        changed = values.get("objective.cross_tokenizer", loss) != loss
        if changed and "objective.cross_tokenizer_params" not in values:  # another loss: its own defaults
            data["objective"]["cross_tokenizer_params"] = {}
    for path, value in values.items():
        try:
            set_path(data, path, _to_plain(value))
        except ConfigError as err:
            raise ConfigError(f"<overrides>: {path!r}: {err}") from None
    return config_from_dict(data, "<overrides>")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A Config (or one section) as plain YAML/JSON-safe data: dicts, lists and scalars.

    Suitable as a cache key's input (json.dumps(..., sort_keys=True)) and as MLflow params.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def dump_config(cfg: Config) -> str:
    """The config as YAML that `load_config` reads back to an equal Config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
