"""Offline side of RecLoRA serving: data preparation, CRM training, embeddings and metrics."""
