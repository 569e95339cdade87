"""The reference model's data: the training text (LAMBADA development passages, WikiText-2 validation), the
test sets its figures use, and their hashes. Never a test file in training."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "scenarios" / "data"
TRAIN_FILES = {"lambada_dev": DATA / "lambada" / "lambada_development_plain_text.txt",
               "wikitext2_valid": DATA / "wikitext-2-raw" / "wiki.valid.raw"}
TEST_FILES = {"wikitext2_test": DATA / "wikitext-2-raw" / "wiki.test.raw",
              "lambada_test": DATA / "lambada" / "lambada_test.jsonl"}
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3
PAD, EOS = 1, 2


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


# Frequent function words: never a last-word target (LAMBADA's targets are names, nouns and verbs).
_STOP = set("""the and for that with was his her she you not but had are they have this from what him were which
their there been would could will them then than when who your our out all one into about just can did its some
very more only also over such like any other these those here where how why most much many well even still""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")


def lambada_passages(texts: list[str]) -> list[tuple[str, str]]:
    """(context, " last word") of each LAMBADA development passage among `texts` (WikiText articles have
    newlines, passages do not)."""
    return [tuple(p.rsplit(" ", 1)) for p in texts if "\n" not in p and " " in p]


def last_word_examples(texts: list[str], rng, words_per_example: int = 40,
                       context_words: int = 80) -> list[tuple[str, str]]:
    """LAMBADA-shaped (context, " word") pairs cut from training text: the word is a content word the ~80
    words of context before it already used, as most LAMBADA targets are (so the model learns to look back
    for the word rather than guess a frequent one)."""
    out = []
    for text in texts:
        words = text.split(" ")
        last: dict[str, int] = {}
        picks = []
        for i, w in enumerate(words):
            if _WORD.fullmatch(w) and w.lower() not in _STOP:
                if i >= 20 and i - last.get(w, -10**9) <= context_words:
                    picks.append(i)
                last[w] = i
        for i in rng.sample(picks, min(len(picks), max(1, len(words) // words_per_example))):
            out.append((" ".join(words[max(0, i - context_words):i]), " " + words[i]))
    return out
