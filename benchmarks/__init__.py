"""Benchmark scripts, each run as `python benchmarks/<name>.py`; `benchmarks.common` holds what they share."""
