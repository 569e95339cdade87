"""Quality of compression on the shipped reference model: WikiText-2 test perplexity and LAMBADA accuracy
for the stored precision against quantized weights, cache and both, at 4 and 3 bits, min-max and search.

Metrics follow lm-evaluation-harness (the definitions the `wikitext` and `lambada` scenarios use):
WikiText documents are articles scored in disjoint windows of the model's length with `</s>` as prefix;
token perplexity exp(-sum logprob / tokens), word perplexity with words = whitespace-separated pieces,
bits per byte -sum logprob / (UTF-8 bytes x ln 2). LAMBADA: context and " " + last word tokenized apart,
correct when every target token is the greedy one. Computed with the runtime directly, all in RAM (the
placement never changes results, see tests/runtime/test_compression.py).
"""

from __future__ import annotations

import csv
import math
import re
import time
from pathlib import Path

from harness.bench.workloads import Workload

REFERENCE = Path(__file__).resolve().parents[2] / "models" / "flexhelm-opt-ref"
Q4, Q3 = {"bits": 4, "group_size": 64}, {"bits": 3, "group_size": 64}
VARIANTS = {
    "stored": {},
    "w4": {"compress_weight": Q4},
    "w4-search": {"compress_weight": {**Q4, "method": "search"}},
    "c4": {"compress_cache": Q4},
    "w4+c4": {"compress_weight": Q4, "compress_cache": Q4},
    "w3": {"compress_weight": Q3},
    "w3-search": {"compress_weight": {**Q3, "method": "search"}},
}


def run(w: Workload, out_dir: Path) -> str:
    from runtime import Engine, Policy
    from runtime.checkpoint import load_tokenizer
    from scenarios.data_files import SHIPPED_WIKITEXT, read_jsonl_field, split_articles
    from scenarios.lambada import SHIPPED_LAMBADA, split_passage

    if not (REFERENCE / "config.json").is_file():
        raise RuntimeError(f"the reference model is missing at {REFERENCE}: train it with scripts/train_reference.py")
    tok = load_tokenizer(REFERENCE)
    docs = split_articles(SHIPPED_WIKITEXT["test"].read_text(encoding="utf-8"))
    passages = read_jsonl_field(SHIPPED_LAMBADA, "text")
    if w.quick:
        docs, passages = docs[:2], passages[:24]
    streams = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    pairs = [split_passage(p) for p in passages]
    contexts = [tok(c, add_special_tokens=False)["input_ids"] for c, _ in pairs]
    targets = [tok(" " + t, add_special_tokens=False)["input_ids"] for _, t in pairs]
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"{w.name}: {REFERENCE.name}, WikiText-2 test {len(docs)} articles ({sum(map(len, streams))} tokens), "
          f"LAMBADA {len(pairs)} passages", flush=True)
    rows = []
    for name, fields in VARIANTS.items():
        t0 = time.perf_counter()
        engine = Engine(REFERENCE, Policy(gpu_batch_size=w.batch, **fields))
        rolling = engine.score_rolling(streams, prefix_token_id=engine.spec.eos_token_id)
        logprob = sum(sum(lp) for lp in rolling.token_logprobs)
        tokens = sum(len(lp) for lp in rolling.token_logprobs)
        scores = engine.score(contexts, targets).scores
        rows.append({"variant": name, "wikitext_token_ppl": math.exp(-logprob / tokens),
                     "wikitext_word_ppl": math.exp(-logprob / words),
                     "wikitext_bits_per_byte": -logprob / (nbytes * math.log(2)),
                     "lambada_acc": sum(s.is_greedy for s in scores) / len(scores),
                     "lambada_target_logprob": sum(s.logprob for s in scores) / len(scores),
                     "weight_bytes": engine.weights.nbytes, "seconds": time.perf_counter() - t0})
        engine.close()
        r = rows[-1]
        print(f"{w.name} {name:10s} ppl {r['wikitext_token_ppl']:8.3f} (word {r['wikitext_word_ppl']:8.2f}, "
              f"bpb {r['wikitext_bits_per_byte']:.4f})  LAMBADA acc {r['lambada_acc']:.4f}  weights "
              f"{r['weight_bytes'] / 2**20:.2f} MiB  {r['seconds']:.0f} s", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{w.name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{w.name} wrote {path}")
    base, both = rows[0], next(r for r in rows if r["variant"] == "w4+c4")
    summary = (f"{w.name} w4+c4: ppl {both['wikitext_token_ppl'] / base['wikitext_token_ppl'] - 1:+.2%} "
               f"lambada_acc {100 * (both['lambada_acc'] - base['lambada_acc']):+.2f} points")
    print(summary, flush=True)
    return summary
