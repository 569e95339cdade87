"""Reports over a suite's run folders: the table of metrics and runtime figures, paired comparisons, plots."""
