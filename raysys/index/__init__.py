"""Indexing: Ray Data encoding into Parquet shards, FAISS build/merge, manifests."""
