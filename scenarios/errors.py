"""Errors raised by scenarios: bad run-spec arguments and missing or malformed data.

Both derive from `ValueError` on purpose: HELM's own code treats a `ValueError` from a data lookup as
"not available" (e.g. `SummarizationMetric` skips QAFactEval / human-evaluation scores it cannot fetch),
so an offline miss of an optional file degrades the same way HELM does, while a miss HELM cannot skip
surfaces with our message.
"""

from __future__ import annotations


class ScenarioArgumentError(ValueError):
    """A scenario or run-spec argument has the wrong type or value, or names nothing known."""


class ScenarioDataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line) and what to do."""
