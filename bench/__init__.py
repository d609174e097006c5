"""Benchmarks: one script per benchmark, each run as `python bench/<name>.py` (see README.md)."""
