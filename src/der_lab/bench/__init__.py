"""Benchmarks runnable as ``der bench <name>``; the scripts in benchmarks/ call these."""

__all__: list[str] = []
