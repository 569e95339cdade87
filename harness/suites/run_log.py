"""A suite run's log file: HELM's and flexhelm's log records of one run into its folder's `run.log`."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path


class RunLog:
    """HELM's log (logger `helm`) and flexhelm's into the run folder's `run.log` while the run lasts. Two runs
    overlap (one computes, the previous one finishes): a record goes to the run its thread works on."""

    NAMES = ("helm", "flexhelm")
    current = threading.local()
    """`.run`: the id of the run this thread works on."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.handler.addFilter(lambda record: getattr(self.current, "run", None) == run_id)
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self.handler)

    def close(self) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self.handler)
        self.handler.close()

    @staticmethod
    @contextlib.contextmanager
    def quiet():
        """For a suite: HELM's chatter belongs in the run logs, not between the progress bars."""
        saved = {}
        for name in RunLog.NAMES:
            logger = logging.getLogger(name)
            saved[name] = (logger.level, logger.propagate)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        try:
            yield
        finally:
            for name, (level, propagate) in saved.items():
                logging.getLogger(name).setLevel(level)
                logging.getLogger(name).propagate = propagate
