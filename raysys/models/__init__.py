"""Models: the embedder (pooling, bidirectional attention, LoRA) and model resolution."""
