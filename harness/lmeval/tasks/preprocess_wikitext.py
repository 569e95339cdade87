"""lm-eval's own WikiText detokenizer and per-document results (`lm_eval/tasks/wikitext`), imported, not copied."""

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

__all__ = ["process_results", "wikitext_detokenizer"]
