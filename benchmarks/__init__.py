"""Benchmark scripts; each prints its table and ratios (see docs/benchmarks.md)."""
