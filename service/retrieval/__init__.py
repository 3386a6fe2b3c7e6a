"""Semantic retrieval over item embeddings (FAISS)."""
