"""From a suite's runtime variant to the runtime `Policy` a run uses, and what `policy.json` records of it (the plan,
its prediction and, after a kill, why it was planned again).

`policy: auto` asks the cost-model planner (`harness.planning.auto_policy`, the LP of `runtime.policy_search`) for the
placement of the run's batch and compression within the variant's memory limits; `policy.json` records its
choice, the prediction (throughput, memory per tier) and the seconds planning took, which count as time in
the runtime (benchmark W5). The runner keeps a run's first plan for its reruns (`ResolvedPolicy.from_json`):
the plan depends on the RAM free at the time, and a changed policy would make the request cache miss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from harness.suites import atomic, memory_watch
from runtime.cost_model import Workload
from runtime.errors import PolicyError

DEFAULT_QUANT_AXIS = "input"


@dataclass(frozen=True)
class ResolvedPolicy:
    policy: object
    """The runtime `Policy` the run uses."""
    requested: str | dict
    """What the suite asked for: `auto` or explicit Policy fields."""
    source: str
    """How `policy` was chosen (`explicit`, `auto: planner`, or `auto: default placement ...` under a fixed default)."""
    prediction: dict | None = None
    """The planner's prediction (throughput, memory per tier), when a planner chose the policy."""
    plan_s: float = 0.0
    """Seconds the planner took (0 when reused or explicit)."""
    replanned: dict | None = None
    """Why an earlier attempt's policy was planned again (it was killed: `run_policy`), else None."""

    def to_json(self) -> dict:
        return {"policy": self.policy.to_json(), "requested": self.requested, "source": self.source,
                "prediction": self.prediction, **({"replanned": self.replanned} if self.replanned else {})}

    @classmethod
    def from_json(cls, data: dict) -> ResolvedPolicy:
        from runtime.policy import Policy

        return cls(Policy.from_json(data["policy"]), data["requested"], data["source"], data.get("prediction"),
                   replanned=data.get("replanned"))


def parse_policy(value, what: str = "policy") -> dict | None:
    """The one reader of policies (`--policy`, lm-eval's `policy=`, the HELM backend's and plugin's): a dict of
    `runtime.Policy` fields, inline JSON, the path of a JSON file, `auto`, or None (then
    `$FLEXHELM_DEFAULT_POLICY`, by default `auto`) -> the Policy fields, or None for `auto` (the caller plans it
    through `auto_policy.plan` for the workload it knows); a `PolicyError` naming `what` otherwise."""
    import json
    import os

    from harness.planning import auto_policy

    if value is None:
        value = auto_policy.default_policy_text()
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if value == auto_policy.AUTO:
        return None
    if isinstance(value, str):
        text, path = value, Path(value).expanduser()
        if not text.lstrip().startswith("{") and path.is_file():
            text = path.read_text()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"{what} {text[:80]!r} is neither a JSON object nor a readable JSON file ({e}); "
                              "or `auto`") from None
    if not isinstance(value, dict):
        raise PolicyError(f"{what} must be a JSON object of runtime.Policy fields, got {value!r}")
    return dict(value)


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
    if variant.compute != "exact":
        fields["compute"] = variant.compute
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



def run_workload(model_dir: str, requests: list) -> Workload | None:
    """The workload of HELM `requests` on the model in `model_dir`: its longest prompt in the model's tokens
    (with the special tokens the backend puts before it) and the most tokens any request generates, within
    the model's positions (None without requests); a scoring workload when none of them generates; the tokens all
    prompts begin with (few-shot examples), which each block shares at least. One batched call into the fast
    tokenizer: a second or so for all of LAMBADA."""
    if not requests:
        return None
    from harness.helm.backend import default_prefix
    from harness.planning import auto_policy
    from runtime.batching import shared_prefix
    from runtime.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer([r.prompt for r in requests], add_special_tokens=False)["input_ids"]
    special = len(default_prefix(tokenizer))
    positions = auto_policy.model_spec(model_dir).max_positions
    gen = min(max(1, max(r.max_tokens for r in requests)), positions // 2)
    scoring = all(r.max_tokens == 0 for r in requests)  # the backend scores these: no KV cache is kept
    prompt_len = min(max(map(len, ids)) + special, positions - gen)
    shared = min(special + shared_prefix(ids), prompt_len - 1) if len(ids) > 1 else 0
    return Workload(prompt_len, gen, scoring=scoring, shared_prefix=shared)


def resolve_policy(run, requests: list | None = None, ram_limit: int | None = None) -> ResolvedPolicy:
    """The Policy `run` (a `harness.suites.suite.RunSpec`) executes with; `auto` is planned for its HELM `requests`
    (their `run_workload`), or without them for the longest request the model accepts, within the variant's
    memory limits and at most `ram_limit` bytes of RAM (the RAM a Ray task reserved for the run)."""
    started = time.perf_counter()
    auto = run.variant.policy == "auto"
    workload = run_workload(run.model.path, requests) if auto and requests else None
    return variant_policy(run.model.path, run.variant, run.batch_size, workload, ram_limit, started)


def variant_policy(model_path: str, variant, batch_size: int | None, workload: Workload | None = None,
                   ram_limit: int | None = None, started: float | None = None) -> ResolvedPolicy:
    """The Policy of `variant` (a `harness.suites.suite.Variant`) at `batch_size` (None: its policy's block): its
    explicit fields, or `auto` planned for `workload` within its memory limits and at most `ram_limit` bytes of RAM.
    Suite runs (`resolve_policy`) and the lm-eval model both come here."""
    from runtime.policy import Policy

    fields = policy_fields(variant, batch_size)
    if variant.policy != "auto":
        return ResolvedPolicy(Policy.from_json(fields), variant.policy, "explicit")
    memory = dict(variant.memory)
    if ram_limit is not None:  # `host` is RAM on every machine (on a CPU-only one it also caps the device tier)
        memory["host"] = min(memory.get("host", ram_limit), ram_limit)
    return _plan_at_block(model_path, fields, memory, workload, started)


def pick_plan(plans: list):
    """Among plans within 10% of the best predicted throughput, the one of fewest micro-batches: the cost model
    prices FLOPs and bytes, not the per-micro-batch work around them (LAMBADA scoring on SmolLM2, 32 passages:
    predicted 5.5 s as 16 micro-batches of 2 and 5.8 s as one of 32, measured 71-93 s against 19-21 s)."""
    best = max(p.prediction.throughput for p in plans)
    return max((p for p in plans if p.prediction.throughput >= 0.9 * best), key=lambda p: p.policy.gpu_batch_size)


def _plan_at_block(model_path: str, fields: dict, memory: dict, workload: Workload | None,
              started: float | None = None) -> ResolvedPolicy:
    """`policy: auto`: the planner picks placement, weight format and the shape of the block (its size stays
    `fields`' block) within the `memory` limits (`auto_policy.Limits` fields), for `workload`, the longest
    request (None: the longest the model accepts). Planning LAMBADA's ~100-token passages as if they filled
    SmolLM2's 8192 positions cost 8 micro-batches of 4 and 3x the time. `$FLEXHELM_DEFAULT_POLICY` other than
    `auto` (the test suite's `{}`) keeps the default placement instead."""
    from harness.planning import auto_policy
    from runtime.policy import Policy

    started = time.perf_counter() if started is None else started
    base = Policy.from_json(fields)
    if auto_policy.default_policy_text() != auto_policy.AUTO:
        return ResolvedPolicy(base, "auto", "auto: default placement ($FLEXHELM_DEFAULT_POLICY)")
    if workload is None:  # provision the longest request the model accepts (as HELM's backend does)
        workload = Workload(*auto_policy.longest_request(auto_policy.model_spec(model_path)))
    prompt_len, gen = workload.prompt_len, workload.gen_len
    plans, error = [], None
    for g in [g for g in range(1, base.block_size + 1) if base.block_size % g == 0]:  # the block size is given
        try:
            plans.append(auto_policy.plan(
                model_path, replace(workload, num_seqs=base.block_size), base=base,
                limits=auto_policy.Limits(**memory), batch_sizes=[g],
                num_batches=[base.block_size // g], compress=[(base.compress_weight, base.compress_cache)]))
        except PolicyError as e:  # this shape does not fit: another may
            error = e
    if not plans:
        raise error
    plan = pick_plan(plans)
    policy = plan.policy
    pred = plan.prediction
    prediction = {"throughput": pred.throughput, "prefill_s": pred.prefill_s, "decode_s": pred.decode_s,
                  "memory": pred.memory, "bottleneck": pred.bottleneck, "binding": plan.binding,
                  "workload": {"prompt_len": prompt_len, "gen_len": gen, "num_seqs": base.block_size,
                               "scoring": workload.scoring, "shared_prefix": workload.shared_prefix}}
    return ResolvedPolicy(policy, "auto", "auto: planner", prediction, time.perf_counter() - started)


def run_policy(run, run_dir: Path, requests: list, ram_limit: int | None = None) -> ResolvedPolicy:
    """The policy `run` (a `harness.suites.suite.RunSpec`) computes with in `run_dir`: the one an earlier attempt
    recorded in policy.json (an `auto` plan depends on the RAM free at the time), else `resolve_policy` for its
    `requests` within `ram_limit`. An earlier attempt that died without ending (SIGKILL, the OOM killer's signal: see
    `harness/suites/memory_watch.py`) gets an `auto` policy planned again below the peak RAM it reached; the request
    cache keeps its finished batches across the new placement (its keys hold only what changes results)."""
    saved = atomic.read_json(run_dir / "policy.json")
    earlier = ResolvedPolicy.from_json(saved) if saved.get("run_key") == run.key else None
    last = memory_watch.last_attempt(run_dir)
    budget = memory_watch.replan_budget(last)
    died = None if budget is None else (f"the last attempt of this run died without ending at "
                                        f"{last['peak_rss'] / 2**30:.2f} GiB of RAM (killed: the OOM killer?)")
    if earlier is not None and (budget is None or run.variant.policy != "auto"):
        if died:
            logging.getLogger("flexhelm").warning(f"{died}; its policy is explicit, so it runs again as it is: give "
                                                  "the variant a smaller one, or `policy: auto` with a `memory:` limit")
        return earlier
    replanned = None
    if died:
        before = earlier.replanned["ram_limit"] if earlier is not None and earlier.replanned else None
        if before:  # killed again under the last replanned limit: below that too, so repeated kills converge
            budget = min(budget, int(memory_watch.SHRINK * before))
        ram_limit = min(budget, ram_limit or budget)
        logging.getLogger("flexhelm").warning(f"{died}: planned again for at most {ram_limit / 2**30:.2f} GiB")
        replanned = {"after_peak_rss": last["peak_rss"], "ram_limit": ram_limit, "attempt": last.get("attempt", 1) + 1}
    resolved = replace(resolve_policy(run, requests, ram_limit), replanned=replanned)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(run_dir / "policy.json", {**resolved.to_json(), "run_key": run.key})
    return resolved
