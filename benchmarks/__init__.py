"""Benchmark scripts that compare tiergen with other systems (not installed)."""
