"""Benchmarks that print numbers: ``speed`` (cost of an edit against text-to-image)."""
