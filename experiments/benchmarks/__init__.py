"""Benchmarks of the project: what docs/ measures, kept out of the installed library.

Run them through the launchers `experiments/bench_*.py`; those put this folder's parent on
`sys.path`, as does tests/conftest.py.
"""
