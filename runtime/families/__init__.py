"""Model families: one module per family, each exposing `spec_from_config` and `build_layers`.

A family turns a config into a `ModelSpec` and a model into a list of layers with the same interface
(`runtime.layers.Layer`), so the engine, the tiers and the schedule never know which family runs.
"""

from __future__ import annotations

from types import ModuleType

from runtime.errors import CheckpointError

_FAMILIES = {"opt": "runtime.families.opt"}
_CONFIGS = {"opt": "runtime.families.opt_config"}
"""Per family, the torch-free module with its `spec_from_config`."""


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def get_family(model_type: str | None) -> ModuleType:
    """The family module for a config's `model_type`, or a clear error naming the supported ones."""
    return _module(_FAMILIES, model_type)


def spec_from_config(config: dict):
    """The `ModelSpec` of a `config.json` (its family's `spec_from_config`, without importing torch)."""
    return _module(_CONFIGS, config.get("model_type")).spec_from_config(config)


def _module(table: dict[str, str], model_type: str | None) -> ModuleType:
    import importlib

    if model_type not in table:
        raise CheckpointError(
            f"unsupported model_type {model_type!r} in config.json; flexhelm supports: "
            f"{', '.join(supported_model_types())}"
        )
    return importlib.import_module(table[model_type])
