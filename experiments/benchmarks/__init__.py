"""Benchmarks of the project: what docs/ measures, kept out of the libraries.

Run them through the launchers `experiments/bench_*.py`.
"""
