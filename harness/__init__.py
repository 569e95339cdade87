"""flexhelm's harness: the command line (`cli`, `suite_cli`, `plan_cli`) over policies (`planning/`), the bridge to
HELM (`helm/`), suites and their runner (`suites/`), reports (`reports/`) and lm-eval (`lmeval/`); the benchmarks
(`bench/`) use these and nothing here uses them. Importing it stays cheap (no torch)."""
