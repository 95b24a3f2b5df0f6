r"""The quick preset: what `make demo` trains, about 6 minutes on 2 CPU cores.

  python experiments/tavr_train.py --config=experiments/configs/tavr_quick.py --workdir=W \
      --data=DIR

A half-width ResNet18 at 128 px for 800 steps (`tavr_jax.config`, preset `runlocal`), with a
fifth of the cases held out as a test split, so `tavr_eval --split=test` scores cases that
neither training nor threshold tuning saw.
"""

from tavr_jax.config import get_config as _tavr_config


def get_config():
    config = _tavr_config("runlocal")
    config.data.test_fraction = 0.2
    return config
