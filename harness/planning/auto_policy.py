"""The `auto` policy: a hardware profile, the user's memory limits and a workload in, a planned Policy out.

Shared by `flexhelm generate`, `flexhelm plan` and the HELM backend. The hardware comes from, in order:
an explicit spec (`--hardware FILE` or a shipped name such as `t4_flexgen`), `$FLEXHELM_HARDWARE`, this
machine's cached profile, or a fresh profile (measured once, ~10-40 s, then cached under
`$FLEXHELM_CACHE/hardware/`). What "no policy given" means is `$FLEXHELM_DEFAULT_POLICY` (default
`auto`; the test suite sets `{}` so that tests not about planning keep the fixed default policy).
Importing this module stays cheap: torch and cvxpy load when a plan is made.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

AUTO = "auto"
COMPRESS_CHOICES = ("none", "weight", "cache", "both", "any")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*")


def default_policy_text() -> str:
    return os.environ.get("FLEXHELM_DEFAULT_POLICY") or AUTO


def size_bytes(value) -> int | None:
    """The one grammar of sizes (suite files' `memory:`, `--host-mem` and the like): `16GiB`, `512 MB`, `1.5GB`,
    `6G` (10^9), `6e9`, or a plain non-negative integer -> bytes; None if it is none of these."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is None or m.group(2).lower() not in _UNITS:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_size(text: str) -> int:
    """`size_bytes`, or a `PolicyError` saying what a size looks like."""
    size = size_bytes(text)
    if size is None:
        from runtime.errors import PolicyError

        raise PolicyError(f"memory size {text!r} is not a size like 6GiB, 512MiB, 6G or 6e9")
    return size


@dataclass(frozen=True)
class Limits:
    """Memory limits the user gave (bytes; None: the machine's)."""

    device: int | None = None
    host: int | None = None
    disk: int | None = None

    def apply(self, hw):
        """`hw` with these limits. On a CPU-only host RAM is the device tier: --host-mem limits it too."""
        if hw.accelerator:
            return hw.with_memory(self.device, self.host, self.disk)
        return hw.with_memory(self.ram, None, self.disk)

    @property
    def ram(self) -> int | None:
        ram = [v for v in (self.device, self.host) if v is not None]
        return min(ram) if ram else None


def compressions(choice: str, bits: int | None = None, group_size: int | None = None) -> list:
    """(weights, cache) QuantConfigs the search may use for `--compress CHOICE`."""
    from runtime.policy import QuantConfig

    q = QuantConfig(**{k: v for k, v in (("bits", bits), ("group_size", group_size)) if v is not None})
    table = {"none": [(None, None)], "weight": [(q, None)], "cache": [(None, q)], "both": [(q, q)],
             "any": [(None, None), (q, None), (None, q), (q, q)]}
    return table[choice]


def computes(choice: str | None) -> list[str]:
    """`Policy.compute` values the search may use for `--compute CHOICE` (`any`: both; none given: exact)."""
    return ["exact", "int8"] if choice == "any" else [choice or "exact"]


def load_hardware(spec: str | None = None, offload_dir: str | None = None, log=None):
    """The HardwareSpec to plan with (see the module docstring for the order)."""
    from runtime.hardware import HardwareSpec, cached_path

    spec = spec or os.environ.get("FLEXHELM_HARDWARE")
    if spec:
        return HardwareSpec.load(spec)
    path = cached_path()
    say = log or (lambda s: print(s, file=sys.stderr))
    if path.is_file():
        hw = HardwareSpec.load(path)
        if hw.accelerator or "int8" in hw.matmul:
            return hw
        from runtime.profiler import int8_rates  # a profile from before `compute: int8`: add its rates (seconds)

        say(f"flexhelm: measuring this CPU's int8 GEMM once for {path}")
        hw = replace(hw, matmul={**hw.matmul, "int8": int8_rates() or hw.matmul["float32"]})
        hw.save(path)
        return hw
    from runtime.profiler import profile

    say(f"flexhelm: no hardware profile for this machine yet: measuring it once (cached as {path})")
    hw = profile(offload_dir, log=say)
    hw.save(path)
    return hw


def usable_now(hw):
    """On this very machine, RAM that other processes hold is not ours to plan with: cap the RAM tier at
    what is available now plus what this process holds (its own memory counts in the plan)."""
    available = _meminfo("MemAvailable")
    if available is None:
        return hw
    ram = available + (hw.base_mem or 0)
    if hw.accelerator:
        return hw.with_memory(host=min(hw.host_mem, ram))
    return hw.with_memory(device=min(hw.device_mem, ram))


def _meminfo(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def model_spec(model_dir: str | os.PathLike):
    """The ModelSpec from a checkpoint's config.json alone (no weights needed: plan for any size)."""
    from runtime.families import spec_from_config
    from runtime.spec import read_config

    config = read_config(Path(model_dir).expanduser())
    return spec_from_config(config)


def workload(prompt_len: int, gen_len: int, num_seqs: int | None = None, shared_prefix: int = 0):
    """A `runtime.cost_model.Workload` from a user's numbers; an `InputError` saying which is out of range."""
    from runtime.cost_model import Workload
    from runtime.errors import InputError

    try:
        return Workload(prompt_len, gen_len, num_seqs, shared_prefix=shared_prefix)
    except ValueError as e:
        raise InputError(str(e)) from None


def plan(model_dir, work, base=None, limits: Limits | None = None, hardware: str | None = None,
         compress: list | None = None, batch_sizes: list[int] | None = None, num_batches: list[int] | None = None,
         offload_dir: str | None = None, computes: list[str] | None = None):
    """The planner: a `runtime.policy_search.Plan` for `work` (a `runtime.cost_model.Workload`) on this checkpoint,
    within the memory `limits`. Every `auto` policy is searched here; its callers only say what the workload is:
    `flexhelm generate` its prompts, `flexhelm plan` its flags, a suite run or an lm-eval call its requests
    (`policies.variant_policy`), HELM's backend the longest request the model accepts, the benchmarks their workload.
    `computes`: the `Policy.compute` values the search may choose from (default: `base`'s)."""
    from runtime.policy_search import search
    from runtime.weights import weight_levels

    hw = hardware_for(hardware, limits, offload_dir)
    spec = model_spec(model_dir)
    # The runtime keeps whole tensors in a tier: plan with the weight fractions it realises as planned.
    levels = functools.partial(weight_levels, spec)
    return search(hw, spec, work, base, batch_sizes, num_batches, compress, weight_levels=levels, computes=computes)


def hardware_for(hardware: str | None = None, limits: Limits | None = None, offload_dir: str | None = None):
    """The spec a plan uses: `load_hardware`, capped at the RAM available now when it is this machine's,
    with the user's limits applied."""
    hw = load_hardware(hardware, offload_dir)
    if not (hardware or os.environ.get("FLEXHELM_HARDWARE")):
        hw = usable_now(hw)
    return (limits or Limits()).apply(hw)


def longest_request(spec) -> tuple[int, int]:
    """(prompt tokens, generated tokens) of the longest request a model accepts, as planned when the requests
    are not known: `HELM_GEN_LEN` generated, the rest of the positions prompt."""
    gen = min(HELM_GEN_LEN, spec.max_positions // 2)
    return spec.max_positions - gen, gen


HELM_GEN_LEN = 64
"""Tokens of output the HELM backend's plan provisions per sequence."""
