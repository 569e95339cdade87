"""Model families: one module per family, each exposing `spec_from_config` and `build_layers`.

A family turns a config into a `ModelSpec` and a model into a list of layers with the same interface
(`runtime.layers.Layer`), so the engine, the tiers and the schedule never know which family runs.
"""

from __future__ import annotations

from types import ModuleType

from runtime.errors import CheckpointError

_FAMILIES = {"opt": "runtime.families.opt"}


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def get_family(model_type: str | None) -> ModuleType:
    """The family module for a config's `model_type`, or a clear error naming the supported ones."""
    import importlib

    if model_type not in _FAMILIES:
        raise CheckpointError(
            f"unsupported model_type {model_type!r} in config.json; flexhelm supports: "
            f"{', '.join(supported_model_types())}"
        )
    return importlib.import_module(_FAMILIES[model_type])
