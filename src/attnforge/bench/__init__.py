"""Benchmarks: timing protocol, kernel sweep, end-to-end scenarios, reports."""
