"""WikiText-2 (raw): rolling-window log-likelihood of whole articles (Merity et al. 2016).

Documents. `wiki.test.raw` (shipped; `split=valid` reads `wiki.valid.raw`, `path=` any file in the same
format) is cut into articles at top-level headings: a line ` = Title = ` starts a document, section lines
` = = Sub = = ` do not. A document is its heading line and every line up to the next heading, joined with
"\\n" exactly as in the file (raw text: no detokenizer, unlike lm-evaluation-harness's `wikitext` task,
which feeds the model detokenized text). Text before the first heading is dropped when blank. The
shipped test split has 62 articles, the count of lm-evaluation-harness's `wikitext_document_level`.

Metrics, with lm-evaluation-harness's definitions, summed over the run before dividing:
- token perplexity exp(-sum logprob / sum predicted tokens) and bits per byte
  -sum logprob / sum bytes / ln 2: HELM's `LanguageModelingMetric` (`perplexity`, `bits_per_byte`).
  HELM counts bytes as the UTF-8 bytes of the predicted tokens' texts (byte tokens in `bytes:\\xNN`
  notation count as their bytes), which sums to len(doc.encode("utf-8")) over a document when the
  client's token texts spell the document;
- word perplexity exp(-sum logprob / sum words), words = len(re.split(r"\\s+", doc)) counted once per
  document: `scenarios.wikitext_metrics.WordPerplexityMetric`.

Windows (HELM's `language_modeling` adapter, `helm/benchmark/adaptation/adapters/
language_modeling_adapter.py`). The adapter encodes a document without special tokens into N tokens and
takes from the model deployment L = max_sequence_length, R = max_request_length (R = L when the
deployment does not set it) and p = the tokenizer config's prefix_token (OPT: "</s>", its BOS). Each
request is one echo prompt (max_tokens=0); the tokens after `num_conditioning_tokens` are scored.
- First request: p + tokens[0:min(L, N)], 1 conditioning token (p), every token scored. If that is
  longer than R (R = L and N >= L), the adapter trims the last token from the request but still moves on
  by L, so token L-1 is never scored.
- Every further request: 1 conditioning token (the previous window's last token) + the next R-1 tokens,
  all scored: disjoint windows. The last one, when shorter, takes more already-scored tokens as
  conditioning so that the request is still R tokens long (its conditioning tokens are not scored).
So with R = L + 1 (set `max_request_length` to `max_sequence_length` + 1 in the model deployment, as
HELM does for `openai/davinci`; the backend then feeds the first L tokens of a request and scores its
last token from them) the windows are exactly lm-evaluation-harness's
`get_rolling_token_windows(tokens, prefix_token=p, max_seq_len=L, context_len=1)`: every token scored
once, windows of L scored tokens each conditioned on one token of the previous window. With the default
R = L each window scores L-1 tokens and one token per document (index L-1) is skipped.
HELM hands the backend each window as text. When a window's text re-encodes to more than R tokens (its
first token, cut out of a word, splits differently on its own), the adapter drops the window's last
tokens to fit and still moves on, so those are never scored. Measured: GPT-2's tokenizer (= OPT's) with
L = 1024, R = 1025 scores all 286,158 tokens of the 62 test articles; a toy 300-token BPE lost 0-12 of
6k-30k tokens per article. Token perplexity and bits per byte count only scored tokens and their bytes;
word perplexity divides by all of a document's words.
"""

from __future__ import annotations

from pathlib import Path

from helm.benchmark.scenarios.scenario import TEST_SPLIT, Input, Instance, Scenario, ScenarioMetadata

from scenarios.arguments import as_choice, as_optional_str
from scenarios.data_files import SHIPPED_WIKITEXT, is_article_heading, require_file, split_articles
from scenarios.errors import ScenarioDataError


class WikiTextScenario(Scenario):
    """WikiText-2 raw articles as language-modelling instances (module docstring: documents, windows)."""

    name = "wikitext"
    description = "WikiText-2 (raw) articles, rolling-window log-likelihood"
    tags = ["language_modeling"]

    def __init__(self, split: str = "test", path: str | None = None):
        super().__init__()
        self.split = as_choice(self.name, "split", split, SHIPPED_WIKITEXT)
        self.path = as_optional_str(self.name, "path", path)

    def get_instances(self, output_path: str) -> list[Instance]:
        path: Path = require_file(self.path, "wikitext path=") if self.path else SHIPPED_WIKITEXT[self.split]
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not any(is_article_heading(line) for line in text.split("\n")):
            raise ScenarioDataError(f"{path}: no ' = Title = ' heading line; not a WikiText raw file")
        documents = split_articles(text)
        return [Instance(input=Input(text=doc), references=[], split=TEST_SPLIT) for doc in documents]

    def get_metadata(self) -> ScenarioMetadata:
        return ScenarioMetadata(
            name="wikitext",
            display_name="WikiText-2",
            description="Rolling-window perplexity on WikiText-2 raw articles (per token, per word, bits per byte).",
            main_metric="word_perplexity",
            main_split="test",
        )
