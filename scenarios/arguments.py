"""Checking run-spec arguments.

Run-spec descriptions arrive as text (`synthetic:num_prompts=8`); HELM's parser turns values that look
like numbers into `int`/`float` and leaves the rest as `str`. These helpers accept both spellings of a
value and raise `ScenarioArgumentError` that names the argument and the scenario when a value is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

from scenarios.errors import ScenarioArgumentError


def as_int(scenario: str, name: str, value: object, minimum: int | None = None) -> int:
    """`value` as an int (an int, or a str of digits), at least `minimum`."""
    # bool is an int subclass; `num_prompts=True` is a mistake, not 1.
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        result = int(value)
    else:
        raise ScenarioArgumentError(f"{scenario}: {name} must be an integer, got {value!r}")
    if minimum is not None and result < minimum:
        raise ScenarioArgumentError(f"{scenario}: {name} must be >= {minimum}, got {result}")
    return result


def as_choice(scenario: str, name: str, value: object, choices: Iterable[str]) -> str:
    """`value` as one of `choices` (exact spelling)."""
    allowed = list(choices)
    if not isinstance(value, str) or value not in allowed:
        raise ScenarioArgumentError(f"{scenario}: {name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def as_optional_str(scenario: str, name: str, value: object) -> str | None:
    """`value` as a non-empty str, or None when not given."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ScenarioArgumentError(f"{scenario}: {name} must be a non-empty string, got {value!r}")
    return value
