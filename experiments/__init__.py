"""Experiments: the absl launchers (one library call each), the paper studies and the benchmarks.

Installed with the project, so launchers, tests and notebooks import it as a package
(`experiments.benchmarks`, `experiments.studies`) without any path settings.
"""
