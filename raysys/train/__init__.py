"""Training: Ray Train `train_func`, DeepSpeed engine, checkpoints and export."""
