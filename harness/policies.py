"""From a suite's runtime variant to the runtime `Policy` a run uses, and what `policy.json` records of it.

`resolve_policy` is the one seam for `policy: auto`: today it returns the default Policy with the variant's
compression and batch; the cost-model planner (runtime/, being built) plugs in at `_plan_auto` and
returns its choice with the predicted throughput and memory per tier, which `policy.json` then records.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import PolicyError

DEFAULT_QUANT_AXIS = "input"


@dataclass(frozen=True)
class ResolvedPolicy:
    policy: object
    """The runtime `Policy` the run uses."""
    requested: str | dict
    """What the suite asked for: `auto` or explicit Policy fields."""
    source: str
    """How `policy` was chosen (`explicit`, `auto: default policy (planner not available)`, `auto: planner`)."""
    prediction: dict | None = None
    """The planner's prediction (throughput, memory per tier), when a planner chose the policy."""

    def to_json(self) -> dict:
        return {"policy": self.policy.to_json(), "requested": self.requested, "source": self.source,
                "prediction": self.prediction}


def policy_fields(variant, batch_size: int | None) -> dict:
    """The Policy fields of `variant` at `batch_size` (None: the policy's own block), checked by the runtime."""
    from runtime.policy import Policy, QuantConfig

    fields = dict(variant.policy) if isinstance(variant.policy, dict) else {}
    if variant.compress.value != "off":
        quant = QuantConfig(bits=variant.bits, group_size=variant.group_size).to_json()
        if variant.compress.value in ("weights", "both"):
            fields["compress_weight"] = quant
        if variant.compress.value in ("cache", "both"):
            fields["compress_cache"] = quant
    if batch_size is not None:
        per_block = fields.get("num_gpu_batches", 1)
        if not isinstance(per_block, int) or batch_size % per_block:
            raise PolicyError(f"batch size {batch_size} is not a multiple of the policy's num_gpu_batches "
                              f"({per_block}): a block holds gpu_batch_size * num_gpu_batches requests")
        fields["gpu_batch_size"] = batch_size // per_block
    Policy.from_json(fields)  # raises PolicyError naming the bad field
    return fields


def default_batch_size(variant) -> int:
    """Requests per engine call when a variant sweeps no batch sizes: its policy's block."""
    from runtime.policy import Policy

    return Policy.from_json(policy_fields(variant, None)).block_size


def resolve_policy(run) -> ResolvedPolicy:
    """The Policy `run` (a `harness.suite.RunSpec`) executes with."""
    from runtime.policy import Policy

    variant = run.variant
    fields = policy_fields(variant, run.batch_size)
    if variant.policy != "auto":
        return ResolvedPolicy(Policy.from_json(fields), variant.policy, "explicit")
    return _plan_auto(run, fields)


def _plan_auto(run, fields: dict) -> ResolvedPolicy:
    """`policy: auto`. The seam for the planner: given the model folder, the batch, the compression and the
    variant's memory limits (`run.variant.memory`, bytes per tier), choose placement and return its prediction.
    Until it lands: the default placement (everything in device memory, which on a CPU host is RAM)."""
    from runtime.policy import Policy

    return ResolvedPolicy(Policy.from_json(fields), "auto", "auto: default policy (planner not available yet)")
