"""lm-evaluation-harness on the flexhelm runtime: the lm-eval model `flexhelm` and local-data tasks.

- `harness.lmeval.model`: `FlexhelmLM`, registered in lm-eval's model registry as `flexhelm` when imported.
- `harness.lmeval.cli`: `flexhelm lm-eval ARGS...`, lm-eval's own command line with the model registered and
  the shipped tasks on its include path (lm-eval 0.4 finds models only in its own table, not through
  entry points, so plain `lm_eval --model flexhelm` cannot see a model another package installs).
- `harness/lmeval/tasks/`: `lambada_openai_local` and `wikitext_local`, lm-eval's `lambada_openai` and
  `wikitext` task definitions reading the data files flexhelm ships instead of the hub.

Install with the `lmeval` extra: `pip install -e ".[lmeval]"`.
"""
