"""Training infrastructure: optimizers, sharding, checkpoints, metrics."""
