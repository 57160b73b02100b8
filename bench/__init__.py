"""Benchmarks: `python -m bench` runs every case and prints medians and ratios."""
