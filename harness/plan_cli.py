"""`flexhelm plan` (the policy `auto` would choose, with its predicted cost) and `flexhelm profile`
(measure this machine, optionally fit the cost model's efficiency factors to measured runs)."""

from __future__ import annotations

import argparse
import json
import sys

from harness.planning import auto_policy
from harness.planning.calibrate import FIT_MODEL, FIT_MODELS

_GiB = 2**30


def add_planning_args(p: argparse.ArgumentParser) -> None:
    """Flags that shape an `auto` plan: memory limits, allowed compression, the hardware spec."""
    p.add_argument("--device-mem", help="device memory limit, e.g. 12GiB (CPU-only host: RAM, with --host-mem)")
    p.add_argument("--host-mem", help="host RAM limit, e.g. 6GiB (the whole process counts)")
    p.add_argument("--disk-mem", help="disk space limit for offloaded data, e.g. 100GiB")
    p.add_argument("--hardware", help="hardware spec JSON or a shipped name (t4_flexgen); default: this machine's "
                                      "cached profile, measured on first use")


def limits(args: argparse.Namespace) -> auto_policy.Limits:
    size = lambda v: None if v is None else auto_policy.parse_size(v)
    return auto_policy.Limits(size(args.device_mem), size(args.host_mem), size(args.disk_mem))


def describe(plan, hw_note: str = "") -> str:
    """The plan in a few lines: policy, predicted throughput, memory per tier, bottleneck, binding constraint."""
    p, pred = plan.policy, plan.prediction
    place = lambda pl: f"device {pl.device:.1%} host {pl.host:.1%} disk {pl.disk:.1%}"
    comp = lambda q: "none" if q is None else f"{q.bits}-bit group {q.group_size}"
    lines = [
        f"policy: gpu_batch_size {p.gpu_batch_size} x num_gpu_batches {p.num_gpu_batches} (block {p.block_size}), "
        f"weight_format {p.weight_format.value}, overlap {'on' if p.overlap else 'off'}",
        f"  weights {place(p.weights)}; cache {place(p.cache)}; activations {place(p.activations)}",
        f"  compression: weights {comp(p.compress_weight)}, cache {comp(p.compress_cache)}; compute {p.compute}",
        f"predicted throughput: {pred.throughput:.3g} token/s (prefill {pred.prefill_s:.3g} s + decode "
        f"{pred.decode_s:.3g} s)",
        "memory per tier (GiB, peak / limit): " + ", ".join(
            f"{t} {pred.memory[t] / _GiB:.2f} / {cap / _GiB:.2f}" for t, cap in plan.capacities.items()),
        f"bottleneck: {pred.bottleneck}; binding constraint: {plan.binding}{hw_note}",
    ]
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    work = auto_policy.workload(args.prompt_len, args.gen_len, args.num_seqs, args.shared_prefix)
    from runtime.policy import Policy

    plan = auto_policy.plan(args.model, work, Policy(), limits=limits(args), hardware=args.hardware,
                            computes=auto_policy.computes(args.compute),
                            compress=auto_policy.compressions(args.compress, args.bits, args.group_size),
                            batch_sizes=[args.batch_size] if args.batch_size else None,
                            num_batches=[args.num_batches] if args.num_batches else None)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(describe(plan))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from runtime.hardware import cached_path
    from runtime.profiler import profile

    log = lambda s: print(s, file=sys.stderr)
    hw = profile(args.offload_dir, log=log)
    if args.fit:
        from harness.planning.calibrate import fit

        hw = fit(hw, model=args.fit_model, log=log)
    path = hw.save(args.out or cached_path())
    print(json.dumps(hw.to_json(), indent=2) if args.json else f"hardware profile written to {path}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("plan", help="print the policy `auto` would choose and its predicted cost")
    p.add_argument("--model", required=True, help="checkpoint folder (only its config.json is read)")
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--gen-len", type=int, required=True)
    p.add_argument("--num-seqs", type=int, help="number of prompts (default: as many as the best block holds)")
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="tokens every prompt begins with (few-shot examples), computed once per micro-batch")
    p.add_argument("--compress", choices=auto_policy.COMPRESS_CHOICES, default="none",
                   help="compression the search may use: none (default, exact), weight, cache, both, any")
    p.add_argument("--bits", type=int, help="bits of --compress (default 4)")
    p.add_argument("--group-size", type=int, help="group size of --compress (default 64)")
    p.add_argument("--compute", choices=["exact", "int8", "any"], default="exact",
                   help="int8: plan int8 weights and activations (CPU; not with weight compression); any: let the "
                        "search choose (int8 changes results: allow it only where that is acceptable)")
    p.add_argument("--batch-size", type=int, help="fix gpu_batch_size instead of searching it")
    p.add_argument("--num-batches", type=int, help="fix num_gpu_batches instead of searching it")
    add_planning_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    f = sub.add_parser("profile", help="measure this machine for the cost model (cached, under a minute)")
    f.add_argument("--out", help="write the profile here (default: the cache, keyed by machine)")
    f.add_argument("--offload-dir", help="folder whose disk is measured (default: the offload folder)")
    f.add_argument("--fit", action="store_true", help="also time a few short runs and fit the cost model's "
                                                      "efficiency factors to them")
    f.add_argument("--fit-model", default=FIT_MODEL, choices=FIT_MODELS,
                   help=f"random-weight model the --fit runs use (default {FIT_MODEL}; a Llama-family shape where "
                        "the models you plan for are)")
    f.add_argument("--json", action="store_true", help="print the profile")
    f.set_defaults(func=cmd_profile)
