"""Benchmarks runnable as ``der bench <name>``; the scripts in benchmarks/ call these."""
