"""The `flexhelm` command line. It only parses arguments into the runtime's spec objects and prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from harness import plan_cli, suite_cli
from harness.planning import auto_policy

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _policy(args: argparse.Namespace, prompt_lens: list[int] | None = None):
    """The Policy from --policy (file or inline JSON, or `auto`: planned), then --percent and the single flags
    on top. Without --policy and --percent: `$FLEXHELM_DEFAULT_POLICY`, by default `auto`."""
    from harness.planning.policies import parse_policy
    from runtime.errors import PolicyError
    from runtime.policy import Placement, Policy

    if args.policy is None and args.percent:
        fields: dict = {}  # --percent alone: the default placement's fields, overridden below
    else:
        fields = parse_policy(args.policy, "--policy")  # None: $FLEXHELM_DEFAULT_POLICY
        if fields is None:
            return _auto_policy(args, prompt_lens or [1])
    if args.percent:
        wg, wc, cg, cc, hg, hc = (p / 100 for p in args.percent)
        fields.update(weights=Placement(wg, wc), cache=Placement(cg, cc), activations=Placement(hg, hc))
    if args.compute == "any":
        raise PolicyError("--compute any lets the `auto` policy choose: drop --policy / --percent, or name one")
    for flag, name in (("batch_size", "gpu_batch_size"), ("num_batches", "num_gpu_batches"), ("device", "device"),
                       ("overlap", "overlap"), ("cpu_attention", "cpu_attention"), ("compute", "compute")):
        if getattr(args, flag) is not None:
            fields[name] = getattr(args, flag)
    quant = {k: v for k, v in (("bits", args.bits), ("group_size", args.group_size)) if v is not None}
    if quant and not (args.compress_weight or args.compress_cache):
        raise PolicyError("--bits / --group-size configure compression: add --compress-weight and/or --compress-cache")
    for flag in ("compress_weight", "compress_cache"):
        if getattr(args, flag):
            fields[flag] = {**(fields.get(flag) or {}), **quant}
    return Policy.from_json(fields)


def _auto_policy(args: argparse.Namespace, prompt_lens: list[int]):
    """The planned policy for these prompts; the single flags fix what they name, the rest is searched."""
    from runtime.policy import Policy, QuantConfig

    quant = {k: v for k, v in (("bits", args.bits), ("group_size", args.group_size)) if v is not None}
    q = QuantConfig(**quant)
    base = Policy(**{name: getattr(args, flag) for flag, name in (
        ("device", "device"), ("overlap", "overlap"), ("cpu_attention", "cpu_attention"))
        if getattr(args, flag) is not None})
    if args.compute == "int8" and args.compress_weight:
        Policy(compute="int8", compress_weight=q)  # raises the PolicyError that says they do not combine
    compress = [(q if args.compress_weight else None, q if args.compress_cache else None)]
    work = auto_policy.workload(max(prompt_lens), args.max_new_tokens, len(prompt_lens))
    plan = auto_policy.plan(args.model, work, base, plan_cli.limits(args), args.hardware, compress,
                            [args.batch_size] if args.batch_size else None,
                            [args.num_batches] if args.num_batches else None, args.offload_dir,
                            auto_policy.computes(args.compute))
    p = plan.prediction
    print(f"auto policy: {plan.policy.gpu_batch_size} x {plan.policy.num_gpu_batches}, compute "
          f"{plan.policy.compute}, weights "
          f"on disk {plan.policy.weights.disk:.0%}, cache on disk {plan.policy.cache.disk:.0%}; predicted "
          f"{p.throughput:.3g} tok/s, bottleneck {p.bottleneck}", file=sys.stderr)
    return plan.policy


def _explain_tiers(args: argparse.Namespace, policy, engine) -> None:
    """On a host without an accelerator the device tier is host RAM: say so rather than merge silently."""
    explicit = (args.policy and args.policy != auto_policy.AUTO) or args.percent
    if explicit and engine.device.type == "cpu" and any(
            p.device > 0 for p in (policy.weights, policy.cache, policy.activations)):
        print("note: no CUDA device: compute runs on the CPU, and device fractions count as host RAM",
              file=sys.stderr)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from runtime.errors import InputError

    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise InputError(f"prompts file {path} does not exist")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompts (one per line expected)")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from runtime.checkpoint import load_tokenizer, read_config
    from runtime.engine import Engine

    prompts = _read_prompts(args)
    read_config(Path(args.model).expanduser())  # a missing folder is named before its tokenizer is looked for
    tokenizer = load_tokenizer(args.model)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    policy = _policy(args, [len(ids) for ids in prompt_ids])
    engine = Engine(args.model, policy, progress=sys.stderr.isatty(), offload_dir=args.offload_dir)
    _explain_tiers(args, policy, engine)
    stops = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in args.stop]
    result = engine.generate(prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, stop_token_sequences=stops, seed=args.seed)
    texts = [tokenizer.decode(g.output_ids, skip_special_tokens=True) for g in result.generations]
    stats = result.stats
    if args.json:
        out = {"model": str(engine.path), "policy": policy.to_json(),
               "weight_bytes_by_tier": engine.weights.bytes_by_tier(), "prompts": [
            {"prompt": p, "prompt_ids": ids, "output_ids": g.output_ids, "output_text": t, "logprobs": g.logprobs,
             "finish_reason": g.finish_reason}
            for p, ids, g, t in zip(prompts, prompt_ids, result.generations, texts)]}
        out.update(stats.to_json())
        print(json.dumps(out, indent=2))
        return 0
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- prompt {i}: {prompts[i]}")
        print(prompts[i] + text if len(texts) == 1 else text)
    _check_limits(args, stats)
    gib = {k: f"{v / 2**30:.2f}" for k, v in stats.peak_memory.items()}
    print(f"[{stats.generated_tokens} tokens, prefill {stats.prefill_s:.2f} s, decode {stats.decode_s:.2f} s, "
          f"{stats.throughput:.1f} tok/s, device {engine.device}, peak GiB {gib}]", file=sys.stderr)
    return 0


def _check_limits(args: argparse.Namespace, stats) -> None:
    """Say so when the run's peak memory went over a limit the user gave (the plan aims below it)."""
    limits = plan_cli.limits(args)
    peaks = stats.peak_memory
    for tier, limit, peak in (("RAM", limits.ram, peaks.get("host")), ("disk", limits.disk, peaks.get("disk"))):
        if limit is not None and peak is not None and peak > limit:
            print(f"warning: peak {tier} {peak / 2**30:.2f} GiB went over the {limit / 2**30:.2f} GiB limit "
                  "(the cost model underestimated this run's memory)", file=sys.stderr)


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from runtime.gguf_import import import_gguf

    out = import_gguf(args.gguf, args.out, dtype=args.dtype, progress=True)
    print(f"imported {args.gguf} into {out}: config.json, safetensors ({args.dtype}), tokenizer files")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from harness import bench  # the benchmarks load only for this command: the product does not need them

    if args.name not in bench.WORKLOADS:
        print(f"flexhelm: error: unknown benchmark {args.name!r}; known: {', '.join(sorted(bench.WORKLOADS))}",
              file=sys.stderr)
        return 2
    setups = bench.workloads.W4_SETUPS
    bad = sorted(set(args.setup) - set(setups))
    if bad:
        print(f"flexhelm: error: --setup {bad[0]!r}: W4's setups are {', '.join(setups)}", file=sys.stderr)
        return 2
    bench.run(args.name, out_dir=Path(args.out), quick=args.quick, setups=tuple(args.setup))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexhelm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a local checkpoint")
    g.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="text file, one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch (Policy.gpu_batch_size)")
    g.add_argument("--num-batches", type=int, help="micro-batches per block (Policy.num_gpu_batches)")
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--policy", help="policy JSON file or inline JSON object (fields of runtime.Policy), or `auto` "
                                    "(the default: planned by the cost model for these prompts and limits)")
    g.add_argument("--percent", nargs=6, type=float, metavar=("WG", "WC", "CG", "CC", "HG", "HC"),
                   help="FlexGen's placement shorthand: percent of weights, KV cache and activations on the "
                        "device (G) and in host RAM (C); the rest goes to disk")
    g.add_argument("--offload-dir", help="folder for disk-offloaded data (default ~/.cache/flexhelm/offload)")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap disk I/O with compute (default on)")
    g.add_argument("--cpu-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA: decode attention next to an off-device cache (default on)")
    g.add_argument("--compress-weight", action="store_true", help="quantize weight matrices (group-wise, 4 bits)")
    g.add_argument("--compress-cache", action="store_true", help="quantize the KV cache (group-wise, 4 bits)")
    g.add_argument("--bits", type=int, help="bits of --compress-weight/--compress-cache: 2, 3, 4 (default) or 8")
    g.add_argument("--group-size", type=int, help="values per quantization group (default 64)")
    g.add_argument("--compute", choices=["exact", "int8", "any"],
                   help="int8: 8-bit weights (a scale per row) times 8-bit activations (a scale per token) in the "
                        "CPU's int8 GEMM; faster, not exact (default: exact; not with --compress-weight); any: the "
                        "`auto` policy chooses")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop sequence (text); repeatable")
    g.add_argument("--json", action="store_true", help="print one JSON object with ids, logprobs and timings")
    plan_cli.add_planning_args(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("import-gguf", help="import a GGUF file (llama, qwen2) as a Hugging Face checkpoint folder")
    i.add_argument("gguf", help="the .gguf file")
    i.add_argument("out", help="a new (or empty) folder for config.json, safetensors and tokenizer files")
    i.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="stored dtype of the dequantized weights (float32 holds them exactly, at twice the size)")
    i.set_defaults(func=cmd_import_gguf)

    b = sub.add_parser("bench", help="run a benchmark workload (W1a, W1b, W1L, W1c, W2, W2L, W3, W4, W5, W6, quality, "
                                      "kernels; see the README)")
    b.add_argument("name")
    b.add_argument("--out", default="results/bench", help="folder for the CSV and PNG")
    b.add_argument("--quick", action="store_true", help="tiny model, for a smoke test")
    b.add_argument("--setup", action="append", default=[],
                   help="W4 only: measure this setup alone (repeatable; default both)")
    b.set_defaults(func=cmd_bench)
    plan_cli.add_parsers(sub)
    suite_cli.add_commands(sub)
    e = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's command line with the `flexhelm` "
                       "model and the shipped local tasks (see `flexhelm lm-eval --help`)")
    e.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv) if argv[:1] != ["lm-eval"] else None
    from runtime.errors import FlexhelmError

    try:
        if args is None:  # lm-eval's own arguments, passed through unparsed
            from harness.lmeval.cli import main as lm_eval_main

            return lm_eval_main(argv[1:])
        return args.func(args)
    except FlexhelmError as e:
        print(f"flexhelm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
