"""The `flexhelm` command line. It only parses arguments into the runtime's spec objects and prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _policy(args: argparse.Namespace):
    from runtime.policy import Policy

    fields = {"device": args.device}
    if args.batch_size is not None:
        fields["gpu_batch_size"] = args.batch_size
    if args.num_batches is not None:
        fields["num_gpu_batches"] = args.num_batches
    return Policy(**fields)


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
    from runtime.checkpoint import load_tokenizer
    from runtime.engine import Engine

    prompts = _read_prompts(args)
    policy = _policy(args)
    engine = Engine(args.model, policy, progress=sys.stderr.isatty())  # validates the folder first
    tokenizer = load_tokenizer(args.model)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    stops = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in args.stop]
    result = engine.generate(prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, stop_token_sequences=stops, seed=args.seed)
    texts = [tokenizer.decode(g.output_ids, skip_special_tokens=True) for g in result.generations]
    stats = result.stats
    if args.json:
        out = {"model": str(engine.path), "policy": policy.to_json(), "prompts": [
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
    print(f"[{stats.generated_tokens} tokens, prefill {stats.prefill_s:.2f} s, decode {stats.decode_s:.2f} s, "
          f"{stats.throughput:.1f} tok/s, device {engine.device}]", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench import run

    run(args.name, out_dir=Path(args.out), quick=args.quick)
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
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop sequence (text); repeatable")
    g.add_argument("--json", action="store_true", help="print one JSON object with ids, logprobs and timings")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="run a benchmark workload (W1a, W1b) against its baseline")
    b.add_argument("name")
    b.add_argument("--out", default="results/bench", help="folder for the CSV and PNG")
    b.add_argument("--quick", action="store_true", help="tiny model, for a smoke test")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    from runtime.errors import FlexhelmError

    try:
        return args.func(args)
    except FlexhelmError as e:
        print(f"flexhelm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
