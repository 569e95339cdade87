"""Policies: the `auto` plan from a hardware profile and memory limits, a run's policy and what `policy.json` records
of it, and the calibration of the cost model that plans (`flexhelm profile --fit`)."""
