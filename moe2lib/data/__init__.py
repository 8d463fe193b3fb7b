"""Benchmark data: loaders that name the first bad line, the task registry and the seeded splits."""
