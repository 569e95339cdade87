"""Evaluation scenarios as HELM `Scenario` subclasses with their run-spec functions."""
