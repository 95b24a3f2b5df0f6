"""Training configs, one per study: `--config=experiments/configs/NAME.py` of tavr_train."""
