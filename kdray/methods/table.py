"""The method declarations as a table (`kdray methods`), as JSON (`--json`) and as docs/methods.md."""

from __future__ import annotations

import json
from typing import Any

from kdray.methods import METHODS, Method


def resolved_terms(method: Method) -> list[dict[str, Any]]:
    """The method's default terms with every parameter the term takes resolved to its default."""
    from kdray.losses.objective import term_defaults

    return [
        {"name": t["name"], "weight": t["weight"], "params": {**term_defaults(t["name"]), **t["params"]}}
        for t in method.terms
    ]


def method_record(method: Method) -> dict[str, Any]:
    """One method as plain data."""
    return {
        "name": method.name,
        "summary": method.summary,
        "terms": resolved_terms(method),
        "needs": sorted(method.needs),
        "data": method.data,
        "on_policy_fraction": method.on_policy_fraction,
        "generations": method.generations,
        "pairs": method.pairs,
        "params": dict(method.params),
        "state": method.state is not None,
        "tokenizer": method.tokenizer,
        "reference": method.reference,
        "deviations": list(method.deviations),
    }


def methods_json() -> str:
    """`kdray methods --json`: a JSON list, one object per method."""
    return json.dumps([method_record(m) for m in METHODS.values()], indent=2)


def _terms_text(method: Method) -> str:
    parts = []
    for t in method.terms:
        params = ", ".join(f"{k}={v}" for k, v in t["params"].items() if v is not None)
        parts.append(f"{t['weight']:g}·{t['name']}({params})")
    return " + ".join(parts)


def methods_table() -> str:
    """`kdray methods`: one block per method."""
    lines = []
    for m in METHODS.values():
        data = m.data if m.data != "on_policy" else f"on_policy (λ={m.on_policy_fraction:g})"
        data += ", preference pairs" if m.pairs else ""
        lines += [
            f"{m.name:<14} {m.summary}",
            f"{'':<14} terms: {_terms_text(m)}",
            f"{'':<14} teacher: {', '.join(sorted(m.needs)) or 'none'}; data: {data}; tokenizers: {m.tokenizer}",
        ]
        if m.params:
            lines.append(f"{'':<14} params: {', '.join(f'{k}={v}' for k, v in m.params.items())}")
        lines += [f"{'':<14} reference: {m.reference}", ""]
    return "\n".join(lines).rstrip()


def methods_markdown() -> str:
    """docs/methods.md: every method, its defaults, and its deviations from the reference with the reason."""
    out = [
        "# Methods",
        "",
        "Generated from the declarations in `kdray/methods/` by `python -m kdray.methods.table > docs/methods.md`;",
        "`kdray methods` prints the same. A deviation is a place where kdray's default differs from the",
        "reference code; each is a config field or a documented choice, with the reason.",
        "",
    ]
    for m in METHODS.values():
        out += [f"## `{m.name}`", "", m.summary + ".", ""]
        out += [f"- Reference: {m.reference}", f"- Default terms: `{_terms_text(m)}`"]
        out += [f"- Needs of the teacher: {', '.join(sorted(m.needs)) or 'nothing'}"]
        data = m.data if m.data != "on_policy" else f"on-policy, λ = {m.on_policy_fraction:g}"
        data += ", preference pairs (`data.preferences: true`)" if m.pairs else ""
        out += [f"- Data: {data}; tokenizers: {m.tokenizer}"]
        if m.params:
            out += [f"- `objective.method_params`: {', '.join(f'`{k}: {v}`' for k, v in m.params.items())}"]
        if m.deviations:
            out += ["- Deviations from the reference:"] + [f"  - {d}" for d in m.deviations]
        else:
            out += ["- Deviations from the reference: none."]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(methods_markdown(), end="")
