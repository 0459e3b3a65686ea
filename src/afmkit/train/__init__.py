"""Pre-training: optimizers and schedules, the pure ``train_step``, checkpoints, metrics and the loop."""
