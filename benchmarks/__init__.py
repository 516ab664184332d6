"""Benchmarks of Quorum Quest: `uv run python -m benchmarks.run` (see README.md)."""
