"""A suite's figures recomputed by HF transformers from the same requests, next to the harness's.

    python scripts/hf_reference.py results/smollm2-reference [--out hf_reference.json]

For every finished run of the suite folder, HF transformers (fp32 compute on the run's checkpoint folder) answers
the run's own HELM requests as the runtime should: an echo request gets the log-prob of every prompt token, a
generation request its greedy tokens (up to `max_tokens`, stopping at EOS). The run's figures are then computed from
HF's answers with the metrics' definitions and printed beside the harness's (`stats.json`), with the relative
difference and how many requests agree token for token. `--every N` compares every N-th LAMBADA passage or WikiText
article (all of its windows), the harness's figure taken over the same instances. A run with 4-bit weights is
compared with HF computing on the 4-bit weights the runtime stores, in fp32 (`WeightCodec.values`: on the CPU the
int4 kernel's form, whose group steps are bf16); the 4-bit KV cache has no HF counterpart, so cache variants compare
with HF on the run's weights and their difference is the cache's effect.

Figures: LAMBADA greedy accuracy (`lambada_accuracy`), target log-likelihood and perplexity (`target_logprob`,
`target_perplexity`), WikiText token and word perplexity and bits per byte (`perplexity`, `word_perplexity`,
`bits_per_byte`), MMLU exact match (`exact_match`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# equal-length batches (no padding, nothing rests on masks) and per-token log-probs with their argmax hits
from reference_eval import _grouped, token_logprobs  # noqa: E402


def _stat(run_dir: Path, name: str) -> float | None:
    for s in json.loads((run_dir / "stats.json").read_text()):
        n = s["name"]
        if n["name"] == name and n.get("split") == "test" and "perturbation" not in n and s.get("count", 0) > 0:
            return s["mean"]
    return None


@functools.lru_cache(maxsize=2)
def _model(folder: str, bits: int | None, group: int | None):
    """HF's model (fp32) of `folder`; with `bits`, every matrix the runtime compresses (decoder linears; not the
    embedding and a head tied to it, which the runtime keeps) replaced by the values the runtime stores for it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runtime.compressed import WeightCodec
    from runtime.policy import QuantConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    if bits is not None:
        codec = WeightCodec(QuantConfig(bits=bits, group_size=group), torch.device("cpu"))
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and (name != "lm_head" or not tied):
                    w = module.weight  # (out, in): groups along the input axis, as the runtime's
                    w.copy_(codec.values(codec.encode(w), tuple(w.shape)))
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _prompt_ids(tok, states: list[dict]) -> list[list[int]]:
    """Each request's prompt as the backend tokenizes it: the tokens the tokenizer puts first, then the text."""
    from harness.helm.backend import default_prefix

    prefix = default_prefix(tok)
    return [prefix + tok(s["request"]["prompt"], add_special_tokens=False)["input_ids"] for s in states]


def _teacher_forced_hits(model, tok, states: list[dict], batch: int) -> list[bool]:
    """LAMBADA as lm-evaluation-harness checks it: the prompt (with the tokens the backend puts first) and
    " " + target tokenized apart, fed once; a hit iff every target token is the argmax at its position."""
    ctxs = _prompt_ids(tok, states)
    tgts = [tok(" " + s["instance"]["references"][0]["output"]["text"], add_special_tokens=False)["input_ids"]
            for s in states]
    scored = token_logprobs(model, [c + t for c, t in zip(ctxs, tgts)], batch)
    return [bool(hit[len(c) - 1:].all()) for c, (_, hit) in zip(ctxs, scored)]


def _answers(model, tok, states: list[dict], batch: int) -> list[dict]:
    """HF's answer to each request: `logprobs` of the prompt's tokens (echo; the first one, unpredicted, 0) or
    the greedy token `ids` (generation)."""
    import torch

    prompts = _prompt_ids(tok, states)
    out: list[dict] = [{} for _ in states]
    echo = [i for i, s in enumerate(states) if s["request"]["max_tokens"] == 0]
    gen = [i for i, s in enumerate(states) if s["request"]["max_tokens"] > 0]
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos  # a finished row is padded with EOS: cut at the first below
    from tqdm import tqdm

    for i, (got, _) in zip(echo, token_logprobs(model, [prompts[i] for i in echo], batch)):
        out[i]["logprobs"] = [0.0] + got.tolist()
    bar = tqdm(total=len(gen), desc="HF generate", unit="request", leave=False)
    with torch.no_grad():
        for idx in _grouped([prompts[i] for i in gen], batch):
            rows = [gen[j] for j in idx]
            n = max(states[i]["request"]["max_tokens"] for i in rows)
            x = torch.tensor([prompts[i] for i in rows])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                               eos_token_id=eos, pad_token_id=pad)[:, x.shape[1]:]
            for i, ids in zip(rows, y.tolist()):
                ids = ids[:states[i]["request"]["max_tokens"]]
                stop = next((k for k, t in enumerate(ids) if _is_eos(t, eos)), len(ids))
                out[i]["ids"] = ids[:stop]
            bar.update(len(idx))
    bar.close()
    return out


def _is_eos(token: int, eos) -> bool:
    return token in eos if isinstance(eos, list) else token == eos


def _correct_letter(state: dict) -> str | None:
    correct = [r["output"]["text"] for r in state["instance"]["references"] if "correct" in r.get("tags", [])]
    mapping = state.get("output_mapping") or {}
    return next((k for k, v in mapping.items() if correct and v == correct[0]), None)


_ANSWERS: dict[tuple, list[dict]] = {}


def compare_run(run_dir: Path, batch: int = 16, every: int = 1) -> dict:
    """The run's figures from HF's answers beside the harness's, and the agreement of the answers; with `every`
    > 1, LAMBADA on every `every`-th passage, WikiText on every `every`-th article (the harness's figure over the
    same instances, from its per-instance stats)."""
    from harness.reports.paired import instance_terms, value_over
    from scenarios.lambada_metrics import covering_suffix
    from scenarios.wikitext_metrics import count_words

    spec = json.loads((run_dir / "flexhelm_run.json").read_text())
    variant, scenario = spec["variant"], spec["scenario"]["run"]
    weights = variant["compress"] in ("weights", "both")
    model, tok = _model(spec["model"]["path"], variant["bits"] if weights else None,
                        variant["group_size"] if weights else None)
    state = json.loads((run_dir / "scenario_state.json").read_text())
    states = [s for s in state["request_states"] if s.get("result", {}).get("success")]
    sampled = every > 1 and scenario.startswith(("lambada", "wikitext"))
    if sampled:  # every N-th passage (LAMBADA) or article (WikiText: all of its windows)
        keep = set(list(dict.fromkeys(s["instance"]["id"] for s in states))[::every])
        states = [s for s in states if s["instance"]["id"] in keep]
    started = time.perf_counter()
    hf_row: dict[str, float] = {}
    agree, max_diff, split_hits = 0, 0.0, None
    if scenario.startswith("lambada") and "greedy" in scenario:
        # independent of how the harness generates: lm-eval's teacher-forced check, passage by passage
        key = (spec["model"]["path"], weights and (variant["bits"], variant["group_size"]), scenario)
        hits = _ANSWERS.get(key) or _ANSWERS.setdefault(key, _teacher_forced_hits(model, tok, states, batch))
        ours = instance_terms(run_dir, "lambada_accuracy")  # (id, 0) -> (hit, 1)
        agree = sum(ours.get((s["instance"]["id"], 0), (None,))[0] == float(h) for s, h in zip(states, hits))
        hf_row["lambada_accuracy"] = sum(hits) / len(hits)
        # the harness counts a word spelled with a non-canonical split right, teacher forcing cannot
        split_hits = sum(ours.get((s["instance"]["id"], 0), (0,))[0] == 1 and _non_canonical(tok, s) for s in states)
    else:
        # a cache variant asks the same requests of the same weights as its uncompressed twin: answered once
        key = (spec["model"]["path"], weights and (variant["bits"], variant["group_size"]), scenario,
               tuple(s["request"]["prompt"] for s in states))
        answers = _ANSWERS.get(key) or _ANSWERS.setdefault(key, _answers(model, tok, states, batch))
        ll_by_doc: dict[str, float] = {}
        words: dict[str, int] = {}
        tokens = bytes_ = 0
        targets = []
        for s, a in zip(states, answers):
            if "logprobs" not in a:  # a generation request (MMLU): greedy answer text
                continue
            ours = s["result"]["completions"][0]["tokens"]
            theirs = a["logprobs"][-len(ours):]
            diffs = [abs(t["logprob"] - h) for t, h in zip(ours, theirs)]
            max_diff = max([max_diff, *diffs[1:]])
            agree += len(ours) == len(a["logprobs"]) and max(diffs[1:], default=0) <= 1e-3
            swapped = [{**t, "logprob": h} for t, h in zip(ours, theirs)]
            if scenario.startswith("lambada"):
                goal = " " + s["instance"]["references"][0]["output"]["text"]
                covering, _ = covering_suffix([_Tok(t) for t in swapped], goal)
                targets.append(sum(t.logprob for t in covering))
            else:  # language modelling: HELM scores the tokens after the window's conditioning ones
                scored = swapped[s.get("num_conditioning_tokens", 0):]
                doc = s["instance"]["id"]
                ll_by_doc[doc] = ll_by_doc.get(doc, 0.0) + sum(t["logprob"] for t in scored)
                words[doc] = count_words(s["instance"]["input"]["text"])
                tokens += len(scored)
                bytes_ += sum(len(_token_bytes(t)) for t in scored)
        if targets:
            mean = sum(targets) / len(targets)
            hf_row.update(target_logprob=mean, target_perplexity=math.exp(-mean))
        if ll_by_doc:
            ll = sum(ll_by_doc.values())
            hf_row.update(perplexity=math.exp(-ll / tokens), word_perplexity=math.exp(-ll / sum(words.values())),
                          bits_per_byte=-ll / bytes_ / math.log(2))
        gen = [(s, a) for s, a in zip(states, answers) if "ids" in a]
        if gen:
            matches = []
            for s, a in gen:
                text = tok.decode(a["ids"])
                agree += text == s["result"]["completions"][0]["text"]
                matches.append(float(text.strip() == _correct_letter(s)))
            hf_row["exact_match"] = sum(matches) / len(matches)
    rows = {}
    ids = list(dict.fromkeys(s["instance"]["id"] for s in states))
    for name, theirs in hf_row.items():
        ours = _stat(run_dir, name)
        if sampled:  # the harness's figure over the same passages
            ours = value_over(run_dir, name, ids)
        rows[name] = {"ours": ours, "hf": theirs,
                      "rel_diff": None if ours is None else abs(ours - theirs) / max(abs(theirs), 1e-12)}
    return {"run": run_dir.name, "requests": len(states), "every": every if sampled else 1, "agree": agree,
            "max_logprob_diff": max_diff, **({"non_canonical_hits": split_hits} if split_hits is not None else {}),
            "hf_seconds": round(time.perf_counter() - started, 1), "figures": rows}


def _non_canonical(tok, state: dict) -> bool:
    """Whether the greedy output spells the LAMBADA target with other tokens than the tokenizer's encoding of it."""
    from harness.helm.token_text import TokenTexts

    canonical = tok(" " + state["instance"]["references"][0]["output"]["text"], add_special_tokens=False)["input_ids"]
    texts = TokenTexts(tok)
    generated = [_token_bytes(t) for t in state["result"]["completions"][0]["tokens"][:len(canonical)]]
    return generated != [texts.token_bytes(i) for i in canonical]


class _Tok:
    def __init__(self, t: dict) -> None:
        self.text, self.logprob = t["text"], t["logprob"]


def _token_bytes(t: dict) -> bytes:
    from scenarios.lambada_metrics import token_bytes

    return token_bytes(_Tok(t))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite_dir", type=Path, help="a suite's results folder (results/<suite>)")
    ap.add_argument("--out", type=Path, help="write the comparison as JSON (default: SUITE_DIR/hf_reference.json)")
    ap.add_argument("--runs", default="*", help="glob of run folder names (default: all finished runs)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--every", type=int, default=1,
                    help="compare LAMBADA on every N-th passage, WikiText on every N-th article (default: all)")
    args = ap.parse_args(argv)
    out = args.out or args.suite_dir / "hf_reference.json"
    done = json.loads(out.read_text()) if out.is_file() else {}
    for run_dir in sorted(args.suite_dir.glob(args.runs)):
        if not (run_dir / "done.json").is_file() or run_dir.name in done:
            continue
        result = compare_run(run_dir, args.batch, args.every)
        done[run_dir.name] = result
        out.write_text(json.dumps(done, indent=2) + "\n")  # one run at a time: an interrupted check resumes
        for name, row in result["figures"].items():
            print(f"{run_dir.name:55s} {name:18s} ours {row['ours']:.6g}  hf {row['hf']:.6g}  "
                  f"rel {row['rel_diff']:.2e}  agree {result['agree']}/{result['requests']}  "
                  + (f"non-canonical hits {result['non_canonical_hits']}  " if "non_canonical_hits" in result else "")
                  + f"({result['hf_seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
