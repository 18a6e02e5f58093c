"""Benchmark Moorage against the CNCF distribution registry; see docs/benchmarks.md."""
