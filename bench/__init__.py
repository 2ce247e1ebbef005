"""Benchmarks for hsu-registry (see README.rst)."""
