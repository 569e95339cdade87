"""Train, evaluate and ship flexhelm's reference model: a small OPT trained here, on 2 CPU cores, from scratch.

Training text: LAMBADA's development passages and WikiText-2's validation split (never a test file). A byte-level
BPE tokenizer is trained on the same text with `tokenizers`; the model is an `OPTForCausalLM` (pre-LN, tied
embeddings) saved in fp16 with its tokenizer, a model card (`README.md`) and `eval_hf.json`. Evaluation uses
HF transformers directly (fp32 compute on the saved fp16 weights), so the figures are independent of the runtime:
WikiText-2 test perplexity (lm-evaluation-harness rolling windows), LAMBADA test accuracy, and a unigram
baseline of the same tokenizer. The defaults reproduce the shipped `models/flexhelm-opt-ref/`:

    nice -n 5 python scripts/train_reference.py            # ~20 min on 2 cores, then ~2 min of evaluation
    python scripts/train_reference.py --eval-only          # re-evaluate the saved folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "scenarios" / "data"
TRAIN_FILES = {"lambada_dev": DATA / "lambada" / "lambada_development_plain_text.txt",
               "wikitext2_valid": DATA / "wikitext-2-raw" / "wiki.valid.raw"}
TEST_FILES = {"wikitext2_test": DATA / "wikitext-2-raw" / "wiki.test.raw",
              "lambada_test": DATA / "lambada" / "lambada_test.jsonl"}
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3
PAD, EOS = 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "models" / "flexhelm-opt-ref")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1, help="the text is repeated ~6 times: dropout curbs overfit")
    p.add_argument("--seq-len", type=int, default=512, help="= max positions: every position the eval uses is trained")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--val-frac", type=float, default=0.02, help="documents held out to monitor overfitting")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate and re-write the card")
    p.add_argument("--no-eval", action="store_true", help="train and save only")
    return p.parse_args(argv)


# ---- data ------------------------------------------------------------------------------------------------
def detok_lambada(line: str) -> str:
    """Undo the LAMBADA plain text's PTB-style tokenization and restore some case, so that the training passages
    look like OpenAI's detokenized, cased test set (`do n't` -> `don't`, `` `` x '' `` -> `"x"`)."""
    s = " " + line.strip() + " "
    s = s.replace(" `` ", ' "').replace(" '' ", '" ').replace(" ` ", " '")
    s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)(?= )", r"\1", s)
    s = re.sub(r" ([,.;:!?%)]|\.\.\.)(?= |\"|')", r"\1", s)
    s = re.sub(r"(?<= )([($]) ", r"\1", s)
    s = re.sub(r"(?<=[a-z]) ' (?=[\"\s])", "' ", s)  # closing single quote
    s = re.sub(r"(?<= )i(?=[ ',.!?;:']|$)", "I", s)  # pronoun I, I'm, I'll
    s = re.sub(r"(^\s*[\"']?|[.!?][\"']? +[\"']?|[,:] \")([a-z])", lambda m: m.group(1) + m.group(2).upper(), s)
    return s.strip()


def wikitext_articles(path: Path) -> list[str]:
    """Articles split at top-level headings (` = Title = `, not ` = = Sub = = `), as lm-evaluation-harness's
    document-level WikiText: lines re-joined with '\n', the heading line first, whitespace-only pages dropped."""
    pages, cur = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if re.fullmatch(r" = [^=].* = ", line):
            pages.append("\n".join(cur))
            cur = []
        cur.append(line)
    pages.append("\n".join(cur))
    return [p for p in pages if p.strip()]


def lambada_test() -> list[tuple[str, str]]:
    """(context, target): context is the text up to the last space, the target ' ' + the last word."""
    items = []
    for line in TEST_FILES["lambada_test"].read_text(encoding="utf-8").splitlines():
        ctx, word = json.loads(line)["text"].rsplit(" ", 1)
        items.append((ctx, " " + word))
    return items


def training_documents() -> list[str]:
    lines = TRAIN_FILES["lambada_dev"].read_text(encoding="utf-8").splitlines()
    return [detok_lambada(x) for x in lines if x.strip()] + wikitext_articles(TRAIN_FILES["wikitext2_valid"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- tokenizer and model ---------------------------------------------------------------------------------
def train_tokenizer(docs: list[str], vocab_size: int, out: Path):
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()  # no prefix space: a document's first word is tokenized as it is written
    bpe.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                            show_progress=False)
    assert [bpe.token_to_id(t) for t in SPECIALS] == [0, PAD, EOS, 3]
    # like OPT's tokenizer, `tok(text)` prepends </s>; the evaluation adds it explicitly instead
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                       special_tokens=[("</s>", EOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.save_pretrained(out)
    return tok


def build_model(args: argparse.Namespace, vocab_size: int):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, ffn_dim=args.ffn, max_position_embeddings=args.seq_len,
                    word_embed_proj_dim=args.hidden, do_layer_norm_before=True, tie_word_embeddings=True,
                    dropout=args.dropout, attention_dropout=0.0, activation_function="relu",
                    pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS, init_std=0.02)
    return OPTForCausalLM(cfg)


# ---- training --------------------------------------------------------------------------------------------
def batches(docs: list[list[int]], args: argparse.Namespace):
    """Endless (batch, seq_len) batches: each epoch re-shuffles documents, joins them as `</s> doc </s> doc ...`,
    cuts at a random offset (so boundaries move between epochs) and shuffles the chunks."""
    import torch

    epoch = 0
    while True:
        rng = random.Random(args.seed * 1000 + epoch)
        order = list(range(len(docs)))
        rng.shuffle(order)
        stream = [t for i in order for t in [EOS] + docs[i]]
        start = rng.randrange(args.seq_len)
        n = (len(stream) - start) // args.seq_len
        chunks = torch.tensor(stream[start:start + n * args.seq_len]).view(n, args.seq_len)
        chunks = chunks[torch.tensor(rng.sample(range(n), n))]
        for i in range(0, n - args.batch + 1, args.batch):
            yield chunks[i:i + args.batch]
        epoch += 1


def val_loss(model, val: list[list[int]], seq_len: int) -> float:
    import torch

    stream = torch.tensor([t for d in val for t in [EOS] + d])
    n = len(stream) // seq_len
    x = stream[:n * seq_len].view(n, seq_len)
    model.eval()
    with torch.no_grad():
        loss = sum(model(input_ids=x[i:i + 8], labels=x[i:i + 8]).loss.item() * len(x[i:i + 8])
                   for i in range(0, n, 8)) / n
    model.train()
    return loss


def train(model, train_docs, val_docs, args) -> dict:
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # matrices and embeddings, not norms/biases
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio * lr
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    it = batches(train_docs, args)
    history, t0, tick, run = [], time.time(), time.time(), []
    model.train()
    for step in range(args.steps):
        x = next(it)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        run.append(loss.item())
        if (step + 1) % 10 == 0:
            now = time.time()
            tps = 10 * x.numel() / (now - tick)
            eta = (now - t0) / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1}/{args.steps} loss {sum(run) / len(run):.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{tps:,.0f} tok/s elapsed {now - t0:.0f}s eta {eta:.0f}s", flush=True)
            tick, run = time.time(), []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            v = val_loss(model, val_docs, args.seq_len)
            history.append({"step": step + 1, "val_loss": round(v, 4)})
            print(f"step {step + 1} held-out loss {v:.4f} (ppl {math.exp(v):.1f})", flush=True)
            tick = time.time()
    return {"train_seconds": round(time.time() - t0, 1), "tokens_seen": args.steps * args.batch * args.seq_len,
            "val_history": history}


# ---- evaluation (HF transformers, fp32) ------------------------------------------------------------------
def _grouped(items: list[list[int]], batch: int):
    """Indices of equal-length items in batches: no padding, so nothing depends on masking."""
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(items):
        by_len.setdefault(len(x), []).append(i)
    for idx in by_len.values():
        for i in range(0, len(idx), batch):
            yield idx[i:i + batch]


def token_logprobs(model, seqs: list[list[int]], batch: int = 8) -> list:
    """Per sequence, log p(seq[i] | seq[:i]) for i >= 1 (a float64 tensor) and whether each was the argmax."""
    import torch

    out: list = [None] * len(seqs)
    with torch.no_grad():
        for idx in _grouped(seqs, batch):
            x = torch.tensor([seqs[i] for i in idx])
            lp = torch.log_softmax(model(input_ids=x[:, :-1]).logits.double(), -1)
            tgt = x[:, 1:]
            got = lp.gather(-1, tgt[..., None])[..., 0]
            hit = lp.argmax(-1) == tgt
            for j, i in enumerate(idx):
                out[i] = (got[j], hit[j])
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

    # lm-eval's get_rolling_token_windows(max_seq_len=window, context_len=1): disjoint windows, each predicting up
    # to `window` new tokens given only the last token of the previous window (</s> before the first)
    articles = wikitext_articles(TEST_FILES["wikitext2_test"])
    wins, n_tok, uni_ll = [], 0, 0.0
    for doc in articles:
        seq = [EOS] + tok(doc, add_special_tokens=False)["input_ids"]
        n_tok += len(seq) - 1
        uni_ll += sum(uni[t] for t in seq[1:])
        wins += [seq[a - 1:a + window] for a in range(1, len(seq), window)]
    t0 = time.time()
    ll = sum(lp.sum().item() for lp, _ in token_logprobs(model, wins))
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
  disjoint windows of {w['window']} tokens as lm-evaluation-harness (`context_len=1`, `</s>` before each article).
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


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import platform

    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out
    docs = training_documents()
    rng = random.Random(args.seed)
    held = set(rng.sample(range(len(docs)), max(1, round(args.val_frac * len(docs)))))
    train_text = [d for i, d in enumerate(docs) if i not in held]
    val_text = [d for i, d in enumerate(docs) if i in held]

    if args.eval_only:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
        info = json.loads((out / "eval_hf.json").read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        tok = train_tokenizer(train_text, args.vocab_size, out)
    enc = lambda texts: [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    train_docs, val_docs = enc(train_text), enc(val_text)
    n_train = sum(len(d) + 1 for d in train_docs)
    print(f"{len(train_docs)} training documents, {n_train:,} tokens; {len(val_docs)} held out", flush=True)

    if not args.eval_only:
        model = build_model(args, len(tok))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"OPT {args.layers}x{args.hidden}, {n_params:,} parameters", flush=True)
        tr = train(model, train_docs, val_docs, args)
        tr.update(train_tokens=n_train, epochs=tr["tokens_seen"] / n_train, cpu=platform.processor() or "cpu")
        model.generation_config.pad_token_id = PAD
        model.half().save_pretrained(out, safe_serialization=True)
        info = {"model": {"parameters": n_params, "vocab_size": len(tok), "layers": args.layers,
                          "hidden": args.hidden, "heads": args.heads, "ffn": args.ffn, "max_positions": args.seq_len},
                "training": tr}
    info["recipe"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                      if k not in ("out", "eval_only", "no_eval")}
    info["data_sha256"] = {f"scenarios/data/{p.relative_to(DATA)}": sha256(p)
                           for p in [*TRAIN_FILES.values(), *TEST_FILES.values()]}
    info["versions"] = (f"torch {torch.__version__}, transformers {transformers.__version__}, "
                        f"tokenizers {tokenizers.__version__}, Python {platform.python_version()}")
    if args.no_eval:
        (out / "eval_hf.json").write_text(json.dumps(info, indent=2) + "\n")
        return
    counts = [0] * len(tok)
    for d in train_docs:
        for t in [EOS] + d:
            counts[t] += 1
    info.update(evaluate(out, counts))
    write_card(out, info)
    print(json.dumps({k: info[k] for k in ("wikitext2_test", "lambada_test")}, indent=2))


if __name__ == "__main__":
    main()
