"""HELM dataclasses to JSON and back, fast enough for runs of a million tokens.

A WikiText run holds ~350k HELM `Token`s. HELM's `asdict_without_nones` (dataclasses.asdict, which deep-copies
every leaf) and `json.dumps(indent=2)` (which falls back to the pure-Python encoder) spent more time on them
than the runtime spent computing them; `to_tree` gives the same values (dataclass fields that are None left
out, as `asdict_without_nones` does), and large files are written compact, which json's C encoder does.
"""

from __future__ import annotations

import dataclasses
import json

_SCALARS = (str, int, float, bool, type(None))
_FIELDS: dict[type, tuple[str, ...]] = {}


def to_tree(obj):
    """`helm.common.general.asdict_without_nones` for any value: dataclasses become dicts without None fields."""
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    if kind in (list, tuple) and obj and _is_token(first := type(obj[0])) and all(type(t) is first for t in obj):
        return [{"text": t.text, "logprob": t.logprob} for t in obj]  # a run's ~1M tokens: no call per field
    names = _FIELDS.get(kind)
    if names is None and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = _FIELDS[kind] = tuple(f.name for f in dataclasses.fields(obj))
    if names is not None:
        out = {}
        for name in names:
            value = getattr(obj, name)
            if value is not None:
                out[name] = to_tree(value)
        return out
    if kind in (list, tuple):
        return [to_tree(v) for v in obj]
    if isinstance(obj, dict):
        return {to_tree(k): to_tree(v) for k, v in obj.items()}
    return obj  # other leaves (enums are str subclasses in HELM) go to json as they are


def _is_token(kind: type) -> bool:
    """HELM's `Token` (two fields, never None), known without importing HELM."""
    return kind.__name__ == "Token" and kind.__module__ == "helm.common.request"


def dumps(tree, compact: bool = False) -> str:
    return json.dumps(tree, separators=(",", ":")) if compact else json.dumps(tree, indent=2)


def result_from_json(data: dict):
    """A `RequestResult` from `to_tree`'s JSON; tokens are built directly (dacite takes seconds per 100k)."""
    import dacite
    from helm.common.request import GeneratedOutput, RequestResult, Token

    completions = []
    for c in data.get("completions", []):
        tokens = [Token(**t) for t in c.get("tokens", [])]
        completions.append(dataclasses.replace(dacite.from_dict(GeneratedOutput, {**c, "tokens": []}), tokens=tokens))
    return dataclasses.replace(dacite.from_dict(RequestResult, {**data, "completions": []}), completions=completions)
