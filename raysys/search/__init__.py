"""Search: query encoding under the index contract, FAISS search, run files, reranking."""
