"""Data: corpus/queries/qrels readers, training groups and collators."""
