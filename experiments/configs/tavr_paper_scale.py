r"""The paper-scale run: ResNet34 at 512 px for 20,000 steps, batch 32, with the best measured
head (stride-4 heatmaps whose evidence joins the visibility; docs/accuracy.md).

  python experiments/tavr_train.py --config=experiments/configs/tavr_paper_scale.py \
      --workdir=W --data=DIR

15% of the cases are held out as a test split for `tavr_eval --split=test`. A GPU is
expected: on 2 CPU cores a step takes seconds.
"""

from tavr_jax.config import get_config as _tavr_config


def get_config():
    config = _tavr_config()
    config.data.test_fraction = 0.15
    return config
