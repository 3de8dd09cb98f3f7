"""Measuring what DELIA claims: tracked-token loss, representation probes, run plots (one module per job)."""
