"""Model families: per family a torch-free config module (`spec_from_config`, `layout`: the weights of each layer)
and a math module (`build_layers`: the layers' `forward`s, `runtime.layers.Layer`), so the engine, the tiers,
the schedule and the cost model never know which family runs.

Families: `opt` (OPTForCausalLM) and `llama` (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM: one
architecture, configured).
"""

from __future__ import annotations

from types import ModuleType

from runtime.errors import CheckpointError

_FAMILY_OF = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
"""config.json's `model_type` -> the family that computes it (`ModelSpec.family`)."""


def supported_model_types() -> list[str]:
    return sorted(_FAMILY_OF)


def get_family(name: str | None) -> ModuleType:
    """The math module of a family (`ModelSpec.family`) or of a config's `model_type`."""
    import importlib

    return importlib.import_module(f"runtime.families.{_family(name)}")


def spec_from_config(config: dict):
    """The `ModelSpec` of a `config.json` (its family's `spec_from_config`, without importing torch)."""
    return _config_module(config.get("model_type")).spec_from_config(config)


def layout(spec) -> list:
    """The `LayerShape`s of a model: its layers and their weights, without importing torch."""
    return _config_module(spec.family).layout(spec)


def _config_module(name: str | None) -> ModuleType:
    import importlib

    return importlib.import_module(f"runtime.families.{_family(name)}_config")


def _family(name: str | None) -> str:
    if name not in _FAMILY_OF:
        raise CheckpointError(
            f"unsupported model_type {name!r} in config.json; flexhelm supports: {', '.join(supported_model_types())}"
        )
    return _FAMILY_OF[name]
