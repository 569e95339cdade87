"""Evaluation scenarios as HELM `Scenario` subclasses with their run-spec functions.

Importing this package loads nothing else (no HELM, no torch). The modules, by job:
- `run_specs`: HELM run-spec functions `lambada`, `wikitext`, `synthetic` (importing it registers them)
  and `build_run_specs(description)`;
- `lambada`, `lambada_metrics`: last-word prediction, greedy accuracy and target log-likelihood;
- `wikitext`, `wikitext_metrics`: rolling-window log-likelihood of WikiText-2 articles, word perplexity;
- `synthetic`: fixed prompt / output length workload for throughput;
- `helm_offline`: `install()` serves HELM's own scenario downloads (MMLU, WikiFact, XSUM, ...) from local files;
- `arguments`, `data_files`, `errors`: argument checks, data locations and readers, the two error types.
"""
