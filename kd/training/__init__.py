"""What the training loop uses besides the module: the optimizer recipe, the LR schedules, exact resume
(atomic checkpoints, RNG state) and the planned number of steps."""
