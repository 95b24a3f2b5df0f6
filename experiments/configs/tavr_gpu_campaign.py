r"""The GPU campaign's training run (experiments/gpu_campaign.py, docs/gpu/): the paper-scale
run in bfloat16, validated every 2,000 steps and checkpointed every 4,000, inside the
campaign's time budget (it sets `time_budget_s` from what the other stages leave).
"""

from experiments.configs.tavr_paper_scale import get_config as _paper_scale


def get_config():
    config = _paper_scale()
    config.dtype = "bfloat16"
    config.eval_every = 2000
    config.checkpoint_every = 4000
    return config
