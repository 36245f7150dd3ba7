"""Training: the activation store, losses, the trainer and metrics."""
