"""W5: harness overhead, the share of a suite's wall time spent outside the runtime (BENCHMARKS.md).

Runs the quickstart suite from scratch into a temporary results folder, in this process, and compares the
wall time of the whole `SuiteRunner.run` (validation, HELM adapt and metrics, request cache, writes) with
the time inside the runtime (model loads and engine calls, as the executor measures them). Quick mode runs
a miniature suite on the tiny benchmark model (with a small tokenizer trained here) for a smoke test.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from harness.bench.workloads import Workload
from harness.planning import random_models

QUICK_SUITE = """\
suite: w5-quick
models:
  - name: w5-tiny
    path: {model}
scenarios:
  - run: lambada:method=greedy
    name: lambada
    max_instances: 8
  - run: wikitext
    name: wikitext
    max_instances: 1
  - run: synthetic:num_prompts=8,prompt_len=16,output_len=4
    name: synthetic
    batch_sizes: [4, 8]
variants:
  - name: fp16
    batch_sizes: [8]
  - name: 4bit
    compress: both
    batch_sizes: [8]
"""


def run(w: Workload, out_dir: Path) -> str:
    from harness.suites.runner import SuiteRunner
    from harness.suites.suite import load_suite

    with tempfile.TemporaryDirectory(prefix="flexhelm-w5-") as scratch:
        suite_path = _quick_suite(Path(scratch)) if w.quick else "quickstart"
        suite = load_suite(suite_path)
        print(f"{w.name}: suite {suite.name}, {len(suite.runs)} runs from scratch", flush=True)
        started = time.perf_counter()
        outcomes = SuiteRunner(Path(scratch) / "results").run(suite)
        wall = time.perf_counter() - started
    failed = [o.run_id for o in outcomes if o.status != "done"]
    if failed:
        raise RuntimeError(f"W5: runs did not finish: {', '.join(failed)}")
    runtime = sum(o.runtime_s for o in outcomes)
    _write_csv(outcomes, out_dir / f"{w.name}.csv")
    print(f"suite wall {wall:.1f} s, runtime {runtime:.1f} s, harness {wall - runtime:.1f} s")
    summary = f"{w.name} overhead={(wall - runtime) / wall:.3f}"
    print(summary)
    return summary


def _write_csv(outcomes, path: Path) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "wall_s", "runtime_s", "harness_s"])
        for o in outcomes:
            writer.writerow([o.run_id, f"{o.wall_s:.3f}", f"{o.runtime_s:.3f}", f"{o.wall_s - o.runtime_s:.3f}"])


def _quick_suite(scratch: Path) -> Path:
    """The tiny benchmark model plus a byte-level BPE tokenizer trained on shipped WikiText (it has none)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from scenarios.data_files import SHIPPED_DATA_DIR

    model = scratch / "model"
    shutil.copytree(random_models.ensure_model("opt-tiny"), model)
    text = (SHIPPED_DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:200_000]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=1000, special_tokens=["<pad>", "</s>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(model)
    path = scratch / "suite.yaml"
    path.write_text(QUICK_SUITE.format(model=model))
    return path
