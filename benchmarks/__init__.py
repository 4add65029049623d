"""Benchmark scripts, run as modules from the repository root: ``python -m benchmarks.report``
(every script, then ``results/REPORT.md``), ``python -m benchmarks.step_time`` and so on."""
