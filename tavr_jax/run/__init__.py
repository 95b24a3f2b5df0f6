"""The files of a training run: its config and thresholds (`workdir`), checkpoints, the refiner."""
