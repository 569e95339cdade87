"""YAML with line numbers: plain Python values plus, for every mapping key and list item, the line it is on.

PyYAML's `safe_load` forgets where values came from; suite errors must name the line. `load()` composes the
node tree (same safe schema) and converts it, recording `Located.lines[path] = line` (1-based) for each path
such as `("variants", 1, "bits")`, so a checker can point at the exact field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml


class YamlSyntaxError(ValueError):
    """The text is not YAML; the message starts with `<file>:<line>:`."""


@dataclass
class Located:
    """A document as plain values (dict, list, str, int, float, bool, None) and where each path starts."""

    value: object
    lines: dict[tuple, int] = field(default_factory=dict)

    def line(self, path: tuple) -> int:
        """Line of `path`, or of its nearest ancestor that has one (1 for the whole document)."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)


def load(text: str, source: str) -> Located:
    """Parse `text` (named `source` in errors). Duplicate keys are an error, as they silently drop data."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise YamlSyntaxError(f"{source}:{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    located = Located(None)
    if node is not None:
        scalars = yaml.SafeLoader("")  # only its scalar constructors are used (YAML 1.1 types: ints, bools, ...)
        located.value = _convert(node, (), located.lines, source, scalars)
    return located


def _convert(node: yaml.Node, path: tuple, lines: dict[tuple, int], source: str, scalars: yaml.SafeLoader):
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            key = scalars.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, (str, int)):
                raise YamlSyntaxError(f"{source}:{key_node.start_mark.line + 1}: keys must be plain names")
            if key in out:
                raise YamlSyntaxError(f"{source}:{key_node.start_mark.line + 1}: key {key!r} appears twice")
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _convert(value_node, path + (key,), lines, source, scalars)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, path + (i,), lines, source, scalars) for i, item in enumerate(node.value)]
    return scalars.construct_object(node)
