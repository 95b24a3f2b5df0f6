"""The paper's studies built on the libraries: Table 1, learning curves, the perfusion comparison.

They are experiment code: the libraries (`tavr_jax`, `perfusion`) do not import them.
"""
