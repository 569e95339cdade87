"""flexhelm's inference runtime: checkpoints, model families, policies and the batch engine."""

from runtime.errors import CheckpointError, FlexhelmError, InputError, PolicyError
from runtime.policy import Policy, WeightFormat
from runtime.spec import ModelSpec

__all__ = ["CheckpointError", "Engine", "FlexhelmError", "InputError", "ModelSpec", "Policy", "PolicyError",
           "WeightFormat"]


def __getattr__(name: str):
    if name == "Engine":  # lazy: importing `runtime` for its specs must not import torch
        from runtime.engine import Engine

        return Engine
    raise AttributeError(name)
