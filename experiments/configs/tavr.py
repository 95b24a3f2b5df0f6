r"""TAVR grouped-keypoint training config: `tavr_jax.config.get_config` (see its docstring).

  python experiments/tavr_train.py --config=experiments/configs/tavr.py --workdir=W --data=DIR
  python experiments/tavr_train.py --config=experiments/configs/tavr.py:runlocal \
      --workdir=W --data=DIR
"""

from tavr_jax.config import get_config

__all__ = ["get_config"]
