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
import json
import math
import os
import random
import time
from pathlib import Path

from reference_data import DATA, EOS, PAD, ROOT, SPECIALS, TEST_FILES, TRAIN_FILES, sha256, training_documents
from reference_eval import evaluate, write_card


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
    p.add_argument("--stage2-steps", type=int, default=0, help="last-word fine-tuning steps after stage 1 (0: none)")
    p.add_argument("--stage2-lr", type=float, default=5e-4)
    p.add_argument("--stage2-batch", type=int, default=16, help="last-word examples per step (plus 2 LM chunks)")
    p.add_argument("--stage2-target-weight", type=float, default=2.0, help="extra loss weight of the last word")
    p.add_argument("--stage2-only", action="store_true", help="fine-tune the saved folder's model (stage 1 done)")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate and re-write the card")
    p.add_argument("--no-eval", action="store_true", help="train and save only")
    return p.parse_args(argv)


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


def last_word_batch(examples: list[tuple[list[int], list[int]]], max_len: int):
    """(ids, labels, target mask), each (B, T): `</s> context target`, right-padded (labels -100 there)."""
    import torch

    seqs = [([EOS] + c)[-(max_len - len(t)):] + t for c, t in examples]
    n = max(map(len, seqs))
    ids, labels, mask = torch.full((len(seqs), n), PAD), torch.full((len(seqs), n), -100), torch.zeros(len(seqs), n)
    for i, (s, (_, t)) in enumerate(zip(seqs, examples)):
        ids[i, :len(s)] = labels[i, :len(s)] = torch.tensor(s)
        mask[i, len(s) - len(t):len(s)] = 1
    return ids, labels, mask


def finetune_last_word(model, tok, train_text: list[str], train_docs, val_text: list[str], args) -> dict:
    """Stage 2: teach the small model LAMBADA's task on training text only. Each step: `stage2_batch`
    last-word examples, half LAMBADA development passages (their real last word), half cut from any
    training text where the word already occurs in the context (`reference_data.last_word_examples`,
    re-cut each pass), with the target's loss weighted up; plus two ordinary 512-token chunks, so
    perplexity keeps its footing. Held-out LAMBADA development passages are monitored (never test data)."""
    import torch
    import torch.nn.functional as F
    from reference_data import lambada_passages, last_word_examples

    def enc(pairs):
        return [(tok(c, add_special_tokens=False)["input_ids"], tok(" " + w.lstrip(), add_special_tokens=False)
                 ["input_ids"]) for c, w in pairs]

    lam, held = enc(lambada_passages(train_text)), enc(lambada_passages(val_text))
    opt = torch.optim.AdamW(model.parameters(), lr=args.stage2_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, i / args.stage2_steps)))))
    lm = batches(train_docs, argparse.Namespace(**{**vars(args), "batch": 2}))
    rng, pool, history, t0 = random.Random(args.seed + 2), [], [], time.time()
    model.train()
    for step in range(args.stage2_steps):
        if len(pool) < args.stage2_batch:
            synth = enc(last_word_examples(train_text, rng))
            half = [lam[i] for i in rng.sample(range(len(lam)), min(len(lam), len(synth)))]
            pool = half + synth
            rng.shuffle(pool)
        part, pool = pool[:args.stage2_batch], pool[args.stage2_batch:]
        ids, labels, mask = last_word_batch(part, 192)
        logits = model(input_ids=ids).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                             reduction="none").view(labels.shape[0], -1)
        known, target = (labels[:, 1:] != -100).float(), mask[:, 1:]
        loss = (ce * known).sum() / known.sum() + args.stage2_target_weight * (ce * target).sum() / target.sum()
        x = next(lm)
        loss = loss + model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == args.stage2_steps:
            acc = last_word_accuracy(model, held)
            history.append({"step": step + 1, "target_loss": round((ce * target).sum().item() / target.sum().item(), 3),
                            "held_out_lambada_dev_acc": round(acc, 4)})
            print(f"stage 2 step {step + 1}/{args.stage2_steps} {history[-1]} {time.time() - t0:.0f}s", flush=True)
    return {"stage2_seconds": round(time.time() - t0, 1), "stage2_history": history}


def last_word_accuracy(model, items) -> float:
    import torch

    model.eval()
    hits = 0
    with torch.no_grad():
        for c, t in items:
            x = torch.tensor([([EOS] + c + t)[-512:]])
            hits += bool((model(input_ids=x[:, :-1]).logits[0, -len(t):].argmax(-1) == torch.tensor(t)).all())
    model.train()
    return hits / max(1, len(items))


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

    from transformers import AutoTokenizer, OPTForCausalLM

    if args.eval_only or args.stage2_only:
        tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
        info = json.loads((out / "eval_hf.json").read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        tok = train_tokenizer(train_text, args.vocab_size, out)
    enc = lambda texts: [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    train_docs, val_docs = enc(train_text), enc(val_text)
    n_train = sum(len(d) + 1 for d in train_docs)
    print(f"{len(train_docs)} training documents, {n_train:,} tokens; {len(val_docs)} held out", flush=True)

    if not (args.eval_only or args.stage2_only):
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
    if args.stage2_steps and not args.eval_only:  # from the saved stage-1 weights: the same start either way
        model = OPTForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
        torch.manual_seed(args.seed + 2)
        info["training"].update(finetune_last_word(model, tok, train_text, train_docs, val_text, args))
        model.half().save_pretrained(out, safe_serialization=True)
    info["recipe"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                      if k not in ("out", "eval_only", "no_eval", "stage2_only")}
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
