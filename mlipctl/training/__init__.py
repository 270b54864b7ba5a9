"""Training: the `fit` engine (loss, optimiser, checkpoints, outputs)."""
