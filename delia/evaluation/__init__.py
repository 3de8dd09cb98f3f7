"""Measuring what DELIA claims, one module per job: answer parsing, metrics, the `<sep>` contrast, `delia eval` and
`delia sweep`; tracked-token loss, representation probes, run plots.

Only `parse_structured` (standard library only) is imported here; the rest loads with its module.
"""

from .parse import parse_structured

__all__ = ["parse_structured"]
