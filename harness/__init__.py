"""flexhelm's harness: CLI, suites, runner, reports and benchmarks. Importing it stays cheap (no torch)."""
