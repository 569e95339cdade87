"""Errors the runtime raises for bad input: each names what is wrong and what to do."""


class FlexhelmError(Exception):
    """Base of every error flexhelm raises on purpose (the CLI prints these without a traceback)."""


class CheckpointError(FlexhelmError):
    """A checkpoint folder is missing, incomplete, corrupt or of an unsupported kind."""


class InputError(FlexhelmError, ValueError):
    """A request to the engine is malformed (empty, too long, out-of-range arguments)."""


class PolicyError(FlexhelmError, ValueError):
    """A policy is invalid or cannot run on this machine."""
