"""`flexhelm lm-eval ARGS...`: lm-eval's own command line (`lm_eval run ...`), with the `flexhelm` model
registered and the shipped local tasks (`lambada_openai_local`, `wikitext_local`) on its include path.

    flexhelm lm-eval --model flexhelm --model_args pretrained=DIR --tasks lambada_openai_local --batch_size 32
"""

from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def main(argv: list[str]) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("flexhelm: error: lm-evaluation-harness is not installed: pip install -e \".[lmeval]\" "
              "(or pip install flexhelm[lmeval])", file=sys.stderr)
        return 2
    import harness.lmeval.model  # noqa: F401  registers the `flexhelm` model

    argv = list(argv)
    if argv and argv[0] not in ("run", "ls", "validate") and not argv[0].startswith("-h"):
        argv.insert(0, "run")
    if argv and argv[0] in ("run", "ls", "validate"):
        argv += _include_path(argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse and lm-eval exit this way
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _include_path(argv: list[str]) -> list[str]:
    """`--include_path` with the shipped tasks folder added to the user's (lm-eval takes one, `:`-separated)."""
    for i, a in enumerate(argv):
        if a == "--include_path" and i + 1 < len(argv):
            argv[i + 1] = f"{argv[i + 1]}:{TASKS_DIR}"
            return []
        if a.startswith("--include_path="):
            argv[i] = f"{a}:{TASKS_DIR}"
            return []
    return ["--include_path", str(TASKS_DIR)]
