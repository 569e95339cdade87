"""Suites: a suite file to frozen runs, and the resumable runner that computes them, locally or on a Ray cluster,
with everything a run folder needs to survive a kill (atomic files, a request cache, a lock, a memory record)."""
