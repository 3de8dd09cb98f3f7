"""The GPU kit's phases (env, cuda, perf, regime), its report and its budgets; `benchmarks/gpu/run.py` drives them.

Each phase is a plain function `run(ctx)` over a `PhaseContext` (report.py): it runs named checks, records metrics and
says what it cut to fit its time budget. delia is imported through its public API only (`from delia import ...`,
`delia.tiny`), since module paths inside the package move.
"""
