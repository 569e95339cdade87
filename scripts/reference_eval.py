"""The reference model's figures with HF transformers directly (fp32 compute on the saved fp16 weights), so they
are independent of flexhelm's runtime, and its model card."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from reference_data import EOS, TEST_FILES, lambada_test, wikitext_articles


def _grouped(items: list[list[int]], batch: int):
    """Indices of equal-length items in batches: no padding, so nothing depends on masking."""
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(items):
        by_len.setdefault(len(x), []).append(i)
    for idx in by_len.values():
        for i in range(0, len(idx), batch):
            yield idx[i:i + batch]


LOGIT_CHUNK = 2**25
"""Logits computed at once (fp32 values): a batch of 8192-token windows over a 49152-token vocabulary would need
25.8 GB at batch 16, so the head runs over a chunk of positions at a time."""


def token_logprobs(model, seqs: list[list[int]], batch: int = 8) -> list:
    """Per sequence, log p(seq[i] | seq[:i]) for i >= 1 (a float64 tensor) and whether each was the argmax."""
    import torch

    body, head = model.base_model, model.get_output_embeddings()  # hidden states (normed), then the vocabulary
    out: list = [None] * len(seqs)
    with torch.no_grad():
        for idx in _grouped(seqs, batch):
            x = torch.tensor([seqs[i] for i in idx])  # (b, T)
            tgt = x[:, 1:]
            h = body(input_ids=x[:, :-1]).last_hidden_state  # (b, T-1, hidden)
            step = max(1, LOGIT_CHUNK // (x.shape[0] * head.weight.shape[0]))
            got, hit = [], []
            for a in range(0, h.shape[1], step):
                lp = torch.log_softmax(head(h[:, a:a + step]).double(), -1)  # (b, t, V)
                t = tgt[:, a:a + step]
                got.append(lp.gather(-1, t[..., None])[..., 0])
                hit.append(lp.argmax(-1) == t)
            got_all, hit_all = torch.cat(got, 1), torch.cat(hit, 1)
            for j, i in enumerate(idx):
                out[i] = (got_all[j], hit_all[j])
    return out


def evaluate(out: Path, counts: list[int]) -> dict:
    """WikiText-2 test perplexity and LAMBADA test accuracy of the saved fp16 checkpoint and of the unigram."""
    import torch
    from transformers import AutoTokenizer, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = OPTForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    window = model.config.max_position_embeddings
    total = sum(counts) + len(counts)
    uni = [math.log((c + 1) / total) for c in counts]  # add-one smoothing over the whole vocabulary
    top = max(range(len(counts)), key=counts.__getitem__)

    # lm-eval's get_rolling_token_windows(max_seq_len=window, context_len=1): every token predicted once, in
    # windows of `window` tokens given the last token of the previous window (</s> before the first); the last,
    # shorter window is given as many earlier tokens as fill the model's positions (only its new ones count)
    articles = wikitext_articles(TEST_FILES["wikitext2_test"])
    wins, scored, n_tok, uni_ll = [], [], 0, 0.0
    for doc in articles:
        seq = [EOS] + tok(doc, add_special_tokens=False)["input_ids"]
        n_tok += len(seq) - 1
        uni_ll += sum(uni[t] for t in seq[1:])
        for a in range(1, len(seq), window):  # a: first token this window predicts
            end = min(a + window, len(seq))
            wins.append(seq[max(0, end - 1 - window):end])
            scored.append(end - a)
    t0 = time.time()
    ll = sum(lp[-k:].sum().item() for (lp, _), k in zip(token_logprobs(model, wins), scored))
    n_words = sum(len(re.split(r"\s+", d)) for d in articles)
    n_bytes = sum(len(d.encode("utf-8")) for d in articles)

    def ppl(loglik: float) -> dict:
        return {"token_perplexity": math.exp(-loglik / n_tok), "word_perplexity": math.exp(-loglik / n_words),
                "bits_per_byte": -loglik / n_bytes / math.log(2)}

    wiki = {"articles": len(articles), "windows": len(wins), "window": window, "tokens": n_tok, "words": n_words,
            "bytes": n_bytes, "model": ppl(ll), "unigram": ppl(uni_ll), "seconds": round(time.time() - t0, 1)}

    # LAMBADA: context and target tokenized apart; correct iff every target token is the greedy one
    t0 = time.time()
    items = lambada_test()
    ctxs = [[EOS] + tok(c, add_special_tokens=False)["input_ids"] for c, _ in items]
    tgts = [tok(w, add_special_tokens=False)["input_ids"] for _, w in items]
    scored = token_logprobs(model, [c + t for c, t in zip(ctxs, tgts)])
    acc = ll_sum = u_acc = u_ll = 0.0
    for c, t, (lp, hit) in zip(ctxs, tgts, scored):
        acc += bool(hit[len(c) - 1:].all())
        ll_sum += lp[len(c) - 1:].sum().item()
        u_acc += all(x == top for x in t)
        u_ll += sum(uni[x] for x in t)
    n = len(items)
    lam = {"examples": n, "prefix": "</s>", "mean_target_tokens": sum(map(len, tgts)) / n,
           "model": {"accuracy": acc / n, "mean_target_loglik": ll_sum / n},
           "unigram": {"accuracy": u_acc / n, "mean_target_loglik": u_ll / n, "greedy_token": tok.decode([top])},
           "seconds": round(time.time() - t0, 1)}
    return {"wikitext2_test": wiki, "lambada_test": lam}


# ---- model card ------------------------------------------------------------------------------------------
def write_card(out: Path, info: dict) -> None:
    (out / "eval_hf.json").write_text(json.dumps(info, indent=2) + "\n")
    w, lam, tr, m, r = info["wikitext2_test"], info["lambada_test"], info["training"], info["model"], info["recipe"]
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in r.items())
    hashes = "\n".join(f"| `{k}` | `{v}` |" for k, v in info["data_sha256"].items())
    vh = ", ".join(f"{h['step']}: {h['val_loss']}" for h in tr["val_history"])
    text = f"""---
license: cc-by-sa-3.0
language: en
library_name: transformers
pipeline_tag: text-generation
tags: [opt, flexhelm, tiny, reference]
---

# flexhelm-opt-ref

A small OPT-architecture language model trained from scratch by `scripts/train_reference.py`, shipped so
that flexhelm's LAMBADA and WikiText runs have a real (if weak) model to evaluate offline. It is a
test fixture with real numbers, not a useful language model.

- Architecture: `OPTForCausalLM`, pre-LN, ReLU, tied input/output embeddings, {m['layers']} layers, hidden
  {m['hidden']}, {m['heads']} heads, FFN {m['ffn']}, {m['max_positions']} positions, {m['parameters']:,} parameters,
  stored in fp16 (safetensors).
- Tokenizer: byte-level BPE (`tokenizers`), vocabulary {m['vocab_size']}, trained on the training text below.
  OPT's special-token ids: `<s>`=0, `<pad>`=1, `</s>`=2 (BOS and EOS), `<unk>`=3; like OPT's tokenizer,
  `tok(text)` prepends `</s>`.

## Evaluation (HF transformers, fp32 compute on the fp16 weights)

| | WikiText-2 test token ppl | word ppl | bits/byte | LAMBADA acc | LAMBADA mean target loglik |
|---|---|---|---|---|---|
| this model | {w['model']['token_perplexity']:.2f} | {w['model']['word_perplexity']:.2f} | \
{w['model']['bits_per_byte']:.4f} | {lam['model']['accuracy']:.4f} | {lam['model']['mean_target_loglik']:.3f} |
| unigram, same tokenizer | {w['unigram']['token_perplexity']:.2f} | {w['unigram']['word_perplexity']:.2f} | \
{w['unigram']['bits_per_byte']:.4f} | {lam['unigram']['accuracy']:.4f} | {lam['unigram']['mean_target_loglik']:.3f} |

- WikiText-2 (`wiki.test.raw`, raw text, no detokenizer): {w['articles']} articles split at top-level headings,
  {w['tokens']:,} tokens, {w['words']:,} words (`len(re.split(r"\\s+", doc))`), {w['bytes']:,} bytes; rolling
  windows of {w['window']} predicted tokens as lm-evaluation-harness (`context_len=1`: each conditioned on the
  previous window's last token, an article's last window on as many earlier tokens as fit; `</s>` before each article).
- LAMBADA (OpenAI's detokenized test set, {lam['examples']} passages): context = text up to the last space,
  target = `" " + last word`, tokenized apart, `</s>` before the context; correct iff the argmax at every target
  position is the target token (teacher forced). Mean target length {lam['mean_target_tokens']:.2f} tokens.
- Unigram: add-one smoothed token frequencies of the training tokens; its greedy guess is always
  `{lam['unigram']['greedy_token']!r}`.

## Training

- Text: LAMBADA development passages (PTB-style tokenized, lowercased; a light detokenizer joins `n't`, `'s` and
  punctuation, turns ``` `` ```/`''` into `"` and capitalizes sentence starts and "I") and WikiText-2 validation
  (raw, one document per article). Never the test files. Documents are joined with `</s>`; {r['val_frac']:.0%} of
  them (seeded) are held out for monitoring.
- Recipe: fp32, AdamW (betas 0.9/0.95, weight decay on matrices and embeddings), linear warmup then cosine to
  {r['min_lr_ratio']} x peak, gradient clipping {r['clip']}, {r['batch']} x {r['seq_len']} tokens per step,
  {tr['tokens_seen']:,} tokens seen ({tr['epochs']:.1f} epochs of {tr['train_tokens']:,} training tokens),
  {tr['train_seconds'] / 60:.1f} minutes on {r['threads']} CPU threads ({tr['cpu']}).
- Held-out loss by step: {vh}.
- Software: {info['versions']}.

| argument | value |
|---|---|
{rows}

Reproduce (defaults = this folder; CPU float arithmetic with the same thread count and library versions):
`nice -n 5 python scripts/train_reference.py`

### Data (sha256 of the files read)

| file | sha256 |
|---|---|
{hashes}

## Licence and attribution

Trained on LAMBADA (Paperno et al. 2016, CC BY 4.0) and WikiText-2 (Merity et al. 2016, from Wikipedia,
CC BY-SA 3.0). The weights are offered under CC BY-SA 3.0, the stricter of the two; the script is Apache-2.0
with the rest of flexhelm.
"""
    (out / "README.md").write_text(text)
