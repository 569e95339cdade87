"""lm-eval's LAMBADA samples (any `--model`, run with `--log_samples`) beside the harness's own LAMBADA runs of a
suite on the same passages: accuracy and target log-likelihood, passage by passage.

    python scripts/lmeval_vs_harness.py LM_EVAL_OUTPUT_DIR results/smollm2-reference

The suite folder must hold the fp16 `lambada` (greedy) and `lambada-likelihood` runs of one model. lm-eval's documents
are matched to HELM instances by their text. The greedy hits the harness counts for a word spelled with a
non-canonical token split are reported apart: lm-eval's teacher-forced check cannot count them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main(lm_eval_dir: str, suite_dir: str) -> None:
    import hf_reference

    from harness.reports.paired import instance_terms
    from runtime.checkpoint import load_tokenizer

    samples_file = next(Path(lm_eval_dir).rglob("samples_lambada*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    greedy_run = next(Path(suite_dir).glob("*--lambada--fp16--*"))
    likelihood_run = next(Path(suite_dir).glob("*--lambada-likelihood--fp16--*"))
    states = json.loads((greedy_run / "scenario_state.json").read_text())["request_states"]
    by_text = {s["instance"]["input"]["text"] + " " + s["instance"]["references"][0]["output"]["text"]: s
               for s in states}
    tok = load_tokenizer(json.loads((greedy_run / "flexhelm_run.json").read_text())["model"]["path"])
    hits, targets = instance_terms(greedy_run, "lambada_accuracy"), instance_terms(likelihood_run, "target_logprob")
    n = agree = split = 0
    acc_lm = acc_ours = ll_lm = ll_ours = worst = 0.0
    for sample in samples:
        state = by_text.get(sample["doc"]["text"])
        if state is None:
            continue
        key = (state["instance"]["id"], 0)
        logprob, greedy = float(sample["filtered_resps"][0][0]), sample["filtered_resps"][0][1] in (True, "True")
        hit = hits[key][0] == 1
        non_canonical = hit and hf_reference._non_canonical(tok, state)
        n += 1
        acc_lm, acc_ours, split = acc_lm + greedy, acc_ours + hit, split + non_canonical
        agree += greedy == hit or non_canonical
        ll_lm, ll_ours = ll_lm + logprob, ll_ours + targets[key][0]
        worst = max(worst, abs(logprob - targets[key][0]))
    print(f"{n} of {len(samples)} lm-eval passages matched to HELM instances")
    print(f"accuracy: lm-eval {acc_lm / n:.4f}, harness greedy {acc_ours / n:.4f}; {agree} passages agree, "
          f"counting the harness's {split} non-canonical-split hits as the documented difference")
    print(f"target log-likelihood, mean: lm-eval {ll_lm / n:.6f}, harness {ll_ours / n:.6f} "
          f"(rel {abs(ll_lm - ll_ours) / abs(ll_ours):.2e}; largest per passage {worst:.2e})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
