"""Training: the loop with its mesh and logging, the paper's losses, the refiner's training."""
