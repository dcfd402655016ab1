"""Benchmarks behind ``adaptive-batch bench``: figures measured side by side in one run."""
