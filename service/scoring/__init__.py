"""The request path of POST /v1/score: history, long-short retrieval, CRM, adapter, LLM, fusion."""
