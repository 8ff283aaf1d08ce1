"""Benchmarks: timing protocol, kernel sweep, end-to-end scenarios, reports."""

from attnforge.bench.optimization import BenchmarkResult, benchmark_optimization

__all__ = ["BenchmarkResult", "benchmark_optimization"]
